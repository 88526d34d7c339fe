"""Runge–Kutta order conditions via rooted trees (Butcher). Used to verify tableaux.

For a rooted tree t with subtrees t_1..t_m, the stage weight vector is
g(t) = prod_k (A g(t_k)) (elementwise; g(single node) = 1), the density is
gamma(t) = |t| prod_k gamma(t_k), and a method has order p iff b . g(t) = 1/gamma(t) for all
trees with |t| <= p. A dense output b(theta) of order q satisfies b(theta) . g(t) =
theta^|t| / gamma(t) for |t| <= q.
"""

from __future__ import annotations

from functools import cache

import numpy as np

Tree = tuple  # a tree is the sorted tuple of its subtrees


@cache
def trees_of_order(n: int) -> tuple[Tree, ...]:
    """All rooted trees with n nodes, each as a canonical nested tuple."""
    if n == 1:
        return ((),)
    out: set[Tree] = set()

    def forests(total: int, max_tree=None):
        # multisets of trees of total order `total`, as sorted tuples
        if total == 0:
            yield ()
            return
        for k in range(1, total + 1):
            for t in trees_of_order(k):
                if max_tree is not None and (k, t) > max_tree:
                    continue
                for rest in forests(total - k, (k, t)):
                    yield ((k, t),) + rest

    for forest in forests(n - 1):
        out.add(tuple(sorted(t for _, t in forest)))
    return tuple(sorted(out))


def order_of(tree: Tree) -> int:
    return 1 + sum(order_of(t) for t in tree)


def gamma(tree: Tree) -> float:
    g = float(order_of(tree))
    for t in tree:
        g *= gamma(t)
    return g


def stage_weights(a: np.ndarray, tree: Tree) -> np.ndarray:
    g = np.ones(a.shape[0])
    for t in tree:
        g = g * (a @ stage_weights(a, t))
    return g


def order_residuals(a: np.ndarray, b: np.ndarray, max_order: int) -> dict[int, float]:
    """Max |b . g(t) - 1/gamma(t)| over all trees of each order 1..max_order."""
    res = {}
    for n in range(1, max_order + 1):
        res[n] = max(abs(b @ stage_weights(a, t) - 1.0 / gamma(t)) for t in trees_of_order(n))
    return res


def extended_matrix(tab) -> np.ndarray:
    """The tableau's A extended by the stage f(t+h, y1) when it is not FSAL."""
    if tab.fsal:
        return tab.a
    s = tab.stages
    a = np.zeros((s + 1, s + 1))
    a[:s, :s] = tab.a
    a[s, :s] = tab.b
    return a


def dense_residuals(tab, max_order: int, thetas=(0.13, 0.5, 0.77, 1.0)) -> dict[int, float]:
    """Order-condition residuals of the tableau's dense output at several theta."""
    a = extended_matrix(tab)
    res = {n: 0.0 for n in range(1, max_order + 1)}
    for th in thetas:
        powers = th ** np.arange(1, tab.dense.shape[1] + 1)
        bt = tab.dense @ powers
        for n in range(1, max_order + 1):
            for t in trees_of_order(n):
                r = abs(bt @ stage_weights(a, t) - th**n / gamma(t))
                res[n] = max(res[n], r)
    return res
