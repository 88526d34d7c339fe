"""Butcher tableaux as data: order conditions (rooted trees), embedded pairs, dense output.

Residuals of exact (rational) tableaux are at round-off (< 1e-15); tsit5 and dopri8 are
given as 16-20 digit decimals, so "satisfied" means a residual below ``SATISFIED`` and
"violated" means one above ``VIOLATED`` (the smallest genuine violation among all
tableaux is ~8e-6, for dopri8's order-9 conditions).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuralode.solvers import SOLVERS
from neuralode.solvers.order_conditions import (
    dense_residuals,
    extended_matrix,
    gamma,
    order_of,
    order_residuals,
    trees_of_order,
)
from neuralode.solvers.tableau import TABLEAUX, ButcherTableau

SATISFIED = 1e-12
VIOLATED = 1e-6

ADAPTIVE = [name for name, tab in TABLEAUX.items() if tab.adaptive]
FIXED = [name for name, tab in TABLEAUX.items() if not tab.adaptive]

# Dense-output order each method claims: its own continuous extension where it has one,
# the cubic Hermite interpolant otherwise (order min(p, 3): it cannot beat the step itself).
DENSE_ORDER = {"dopri5": 4, "tsit5": 4, "dopri8": 5}


def dense_order(tab: ButcherTableau) -> int:
    return DENSE_ORDER.get(tab.name, min(tab.order, 3))


# -- the rooted-tree machinery itself ------------------------------------------------------

def test_number_of_rooted_trees_matches_oeis_a000081():
    # A000081: 1, 1, 2, 4, 9, 20, 48, 115, 286 rooted trees with 1..9 nodes.
    assert [len(trees_of_order(n)) for n in range(1, 10)] == [1, 1, 2, 4, 9, 20, 48, 115, 286]


def test_trees_are_distinct_and_have_the_requested_order():
    for n in range(1, 8):
        trees = trees_of_order(n)
        assert len(set(trees)) == len(trees)
        assert all(order_of(t) == n for t in trees)


def test_density_of_tall_and_bushy_trees():
    # the tall tree (a chain of n nodes) has gamma = n!, the bushy tree gamma = n
    tall = ()
    for n in range(2, 8):
        tall = (tall,)
        assert gamma(tall) == math.factorial(n)
        bushy = tuple(() for _ in range(n - 1))
        assert gamma(bushy) == n


def test_order_conditions_detect_a_perturbed_weight():
    tab = TABLEAUX["rk4_classic"]
    b = tab.b.copy()
    b[0] += 1e-3
    b[3] -= 1e-3  # still sums to 1: order 1 holds; b . c changes, so order 2 must break
    res = order_residuals(tab.a, b, 4)
    assert res[1] < SATISFIED
    assert res[2] > VIOLATED


# -- every tableau -------------------------------------------------------------------------

def test_every_tableau_is_registered_as_a_solver():
    for name in TABLEAUX:
        assert SOLVERS[name].tableau is TABLEAUX[name]


@pytest.mark.parametrize("name", list(TABLEAUX))
def test_tableau_is_explicit_and_consistent(name):
    tab = TABLEAUX[name]
    s = tab.stages
    assert tab.a.shape == (s, s) and tab.b.shape == (s,) and tab.c.shape == (s,)
    assert np.all(np.triu(tab.a) == 0.0), "A must be strictly lower triangular (explicit)"
    assert tab.c[0] == 0.0
    np.testing.assert_allclose(tab.a.sum(axis=1), tab.c, rtol=0, atol=1e-14,
                               err_msg="row sums of A must equal c")
    assert abs(tab.b.sum() - 1.0) < 1e-14


@pytest.mark.parametrize("name", list(TABLEAUX))
def test_tableau_has_its_order_and_not_the_next(name):
    tab = TABLEAUX[name]
    res = order_residuals(tab.a, tab.b, tab.order + 1)
    for n in range(1, tab.order + 1):
        assert res[n] < SATISFIED, f"{name}: order-{n} conditions violated by {res[n]:.2e}"
    assert res[tab.order + 1] > VIOLATED, f"{name} unexpectedly satisfies order {tab.order + 1}"


@pytest.mark.parametrize("name", ADAPTIVE)
def test_embedded_solution_has_the_error_order_and_not_the_next(name):
    tab = TABLEAUX[name]
    assert tab.error_order is not None and tab.error_order < tab.order
    assert abs(tab.b_err.sum()) < 1e-14, "b_err = b - b_hat must sum to zero"
    b_hat = tab.b - tab.b_err
    res = order_residuals(tab.a, b_hat, tab.error_order + 1)
    for n in range(1, tab.error_order + 1):
        assert res[n] < SATISFIED, f"{name}: embedded order-{n} residual {res[n]:.2e}"
    assert res[tab.error_order + 1] > VIOLATED


@pytest.mark.parametrize("name", FIXED)
def test_fixed_grid_methods_have_no_error_estimate(name):
    tab = TABLEAUX[name]
    assert tab.b_err is None and not tab.adaptive


@pytest.mark.parametrize("name", list(TABLEAUX))
def test_dense_output_has_its_stated_order_and_not_the_next(name):
    tab = TABLEAUX[name]
    q = dense_order(tab)
    if name in DENSE_ORDER:
        assert tab.dense_name != "hermite"
    else:
        assert tab.dense_name == "hermite"
    res = dense_residuals(tab, q + 1)
    for n in range(1, q + 1):
        assert res[n] < SATISFIED, f"{name}: dense order-{n} residual {res[n]:.2e}"
    assert res[q + 1] > VIOLATED


@pytest.mark.parametrize("name", list(TABLEAUX))
def test_dense_output_is_continuous_with_the_step(name):
    # theta = 1 gives the step's own weights b (and zero weight on the extended stage),
    # theta = 0 gives zero, so the interpolant is continuous across step boundaries.
    tab = TABLEAUX[name]
    s_ext = tab.dense.shape[0]
    assert s_ext == (tab.stages if tab.fsal else tab.stages + 1)
    at_one = tab.dense.sum(axis=1)
    np.testing.assert_allclose(at_one[: tab.stages], tab.b, rtol=0, atol=2e-12)
    np.testing.assert_allclose(at_one[tab.stages:], 0.0, rtol=0, atol=2e-12)


@pytest.mark.parametrize("name", list(TABLEAUX))
def test_dense_output_derivative_matches_f_at_both_ends(name):
    # d/dtheta b(theta) at theta=0 is e_1 (slope f(t0, y0)), at theta=1 it is the weight of
    # f(t1, y1) (the FSAL stage or the extended stage): the interpolant is C^1 for every
    # method except the 6th-degree dopri8 extension, which is only C^0 at theta = 1.
    tab = TABLEAUX[name]
    degree = tab.dense.shape[1]
    d0 = tab.dense[:, 0]
    d1 = tab.dense @ np.arange(1, degree + 1)
    e_first = np.eye(tab.dense.shape[0])[0]
    e_last = np.eye(tab.dense.shape[0])[-1]
    np.testing.assert_allclose(d0, e_first, atol=1e-12)
    if name != "dopri8":
        np.testing.assert_allclose(d1, e_last, atol=1e-11)


@pytest.mark.parametrize("name", ["dopri5", "tsit5", "bosh3"])
def test_fsal_methods_are_detected(name):
    tab = TABLEAUX[name]
    assert tab.fsal
    np.testing.assert_array_equal(tab.a[-1], tab.b)
    assert tab.c[-1] == 1.0


@pytest.mark.parametrize("name", ["dopri8", "adaptive_heun", "fehlberg2", "rk4"])
def test_non_fsal_methods_are_not_flagged_fsal(name):
    assert not TABLEAUX[name].fsal


def test_extended_matrix_appends_the_step_as_a_stage():
    tab = TABLEAUX["rk4_classic"]
    a = extended_matrix(tab)
    assert a.shape == (5, 5)
    np.testing.assert_array_equal(a[4, :4], tab.b)
    np.testing.assert_array_equal(a[:4, :4], tab.a)
