"""Bad input gets a clear, early error that names the bad value and the valid choices;
failures during a solve say where they happened."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from neuralode import MaxStepsError, ODEFuncError, ODEInputError, StepSizeError, odeint, solve
from neuralode.solvers import ALIASES, SOLVERS
from neuralode.solvers.registry import DEFAULT_METHOD

F64 = torch.float64
Y0 = torch.tensor([1.0, 2.0], dtype=F64)
T01 = torch.tensor([0.0, 1.0], dtype=F64)


class NeverCalled:
    """A func that must not be evaluated: input errors are raised before solving."""

    def __init__(self):
        self.calls = 0

    def __call__(self, t, y):
        self.calls += 1
        return -y


def raises_early(exc, match, **kwargs):
    """odeint(**kwargs) raises exc matching match, without calling func."""
    func = NeverCalled()
    args = {"y0": Y0, "t": T01, **kwargs}
    with pytest.raises(exc, match=match):
        odeint(func, args.pop("y0"), args.pop("t"), **args)
    assert func.calls == 0


def test_error_classes_extend_the_standard_ones():
    assert issubclass(ODEInputError, ValueError) and issubclass(ODEFuncError, ValueError)
    assert issubclass(StepSizeError, RuntimeError) and issubclass(MaxStepsError, RuntimeError)


# -- t ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [torch.zeros(2, 2, dtype=F64), torch.tensor(1.0, dtype=F64)])
def test_t_must_be_one_dimensional(t):
    raises_early(ODEInputError, r"t must be a 1-D tensor.*shape \(" , t=t)


def test_t_must_not_be_empty():
    raises_early(ODEInputError, "t is empty", t=torch.tensor([], dtype=F64))


@pytest.mark.parametrize("values,bad", [([0.0, 1.0, 0.5], r"t\[1\]=1\.0 and t\[2\]=0\.5"),
                                        ([0.0, 1.0, 1.0], r"t\[1\]=1\.0 and t\[2\]=1\.0"),
                                        ([1.0, 0.0, 0.5], r"t\[1\]=0\.0 and t\[2\]=0\.5")])
def test_t_must_be_strictly_monotonic(values, bad):
    raises_early(ODEInputError, "strictly increasing or strictly decreasing.*" + bad,
                 t=torch.tensor(values, dtype=F64))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_t_must_be_finite(value):
    raises_early(ODEInputError, r"t contains non-finite values: \[-?(nan|inf)\]",
                 t=torch.tensor([0.0, value, 2.0], dtype=F64))


def test_t_must_be_real():
    raises_early(ODEInputError, "t must be real.*complex",
                 t=torch.tensor([0.0, 1.0], dtype=torch.complex64))


# -- method and options ------------------------------------------------------------------

def test_options_without_method_apply_to_the_default_method():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # max_num_steps is dopri5's: no warning
        _, stats = odeint(f, y0, t, options={"first_step": 0.5, "max_num_steps": 1000},
                          return_stats=True)
    assert stats.method == DEFAULT_METHOD == "dopri5"
    with pytest.raises(MaxStepsError):  # the option is honoured, not ignored
        odeint(f, y0, t, options={"max_num_steps": 2})


def test_options_without_method_the_default_does_not_use_warn():
    with pytest.warns(UserWarning, match=r"'dopri5' does not use the option\(s\) \['step_size'\]"):
        odeint(lambda t, y: -y, torch.tensor([1.0], dtype=F64),
               torch.tensor([0.0, 1.0], dtype=F64), options={"step_size": 0.1})


def test_checked_options_are_kept_as_copies_and_warnings_come_at_every_solve():
    # options of plain values are checked once per (method, options) and kept: each solve
    # gets its own copy; options that warned are not kept, so every solve warns, at the
    # caller's line
    from neuralode.problem import method_options
    a = method_options("dopri5", {"max_num_steps": 50})
    a["max_num_steps"] = 7
    assert method_options("dopri5", {"max_num_steps": 50})["max_num_steps"] == 50
    with pytest.raises(ODEInputError, match="positive int"):  # (equal to 50, not an int)
        method_options("dopri5", {"max_num_steps": 50.0})
    for _ in range(2):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            odeint(lambda t, y: -y, Y0, T01, options={"step_size": 0.1})
        assert [w.filename for w in rec if "does not use" in str(w.message)] == [__file__]
    with pytest.raises(ODEInputError, match="max_num_steps"):
        odeint(lambda t, y: -y, Y0, T01, options={"max_num_steps": 0})


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ODEInputError, match="unknown method 'rk45'") as info:
        odeint(NeverCalled(), Y0, T01, method="rk45")
    for name in list(SOLVERS) + list(ALIASES):
        assert repr(name) in str(info.value)


def test_method_must_be_a_string():
    raises_early(ODEInputError, "method must be a string, got int", method=5)


def test_options_must_be_a_dict():
    raises_early(ODEInputError, "options must be a dict, got list", method="rk4",
                 options=[("step_size", 0.1)])


@pytest.mark.parametrize("method,bad,valid", [
    ("dopri5", "stepsize", ["first_step", "max_num_steps", "norm", "jump_t", "step_t"]),
    ("rk4", "first_step", ["step_size", "grid_constructor", "perturb", "interp"]),
    ("explicit_adams", "max_iters", ["step_size", "max_order"]),
])
def test_unknown_option_warns_naming_it_and_the_valid_ones(method, bad, valid):
    # torchdiffeq ignores an option the method does not use with a warning; so do we
    with pytest.warns(UserWarning, match=rf"method '{method}' does not use the option\(s\) "
                                         rf"\['{bad}'\]") as info:
        ys = odeint(lambda t, y: -y, Y0, T01, method=method,
                    options={bad: 1, **({} if method == "dopri5" else {"step_size": 0.1})})
    msg = str(info[0].message)
    assert all(repr(v) in msg for v in valid)
    assert torch.allclose(ys[-1], Y0 * math.exp(-1), rtol=1e-3)


@pytest.mark.parametrize("value", [0, -0.1, math.nan, math.inf, "big"])
def test_bad_step_size(value):
    raises_early(ODEInputError, r"option 'step_size' of 'rk4' must be a (positive finite )?"
                                r"number, got", method="rk4", options={"step_size": value})


def test_step_size_and_grid_constructor_are_exclusive():
    raises_early(ODEInputError, "at most one of the options 'step_size' and 'grid_constructor'",
                 method="rk4", options={"step_size": 0.1, "grid_constructor": lambda f, y, t: t})


def test_bad_interp_choice():
    raises_early(ODEInputError, r"'interp' of 'euler' must be 'cubic'.*or 'linear', got 'quad'",
                 method="euler", options={"step_size": 0.1, "interp": "quad"})


@pytest.mark.parametrize("grid,match", [
    (torch.linspace(0.0, 0.9, 5, dtype=F64), r"ending at t\[-1\]=1\.0.*to 0\.9"),
    (torch.linspace(0.1, 1.0, 5, dtype=F64), r"starting at t\[0\]=0\.0.*from 0\.1"),
    (torch.tensor([0.0, 0.6, 0.4, 1.0], dtype=F64), "strictly monotonic"),
    (torch.tensor([0.0], dtype=F64), "with 1 points"),
    (torch.tensor([0.0, math.nan, 1.0], dtype=F64), r"non-finite times: \[nan\]"),
    (torch.tensor([[0.0, 1.0]], dtype=F64), r"1-D tensor of times, got shape \(1, 2\)"),
    (None, "1-D tensor of times, got NoneType"),
])
def test_grid_constructor_returning_a_bad_grid(grid, match):
    raises_early(ODEInputError, match, method="rk4",
                 options={"grid_constructor": lambda f, y, t: grid})


def test_grid_constructor_receives_func_y0_and_t():
    seen = {}

    def grid_constructor(func, y0, t):
        seen.update(func=func, y0=y0, t=t)
        return torch.linspace(float(t[0]), float(t[-1]), 11, dtype=F64)

    def func(t, y):
        return -y

    odeint(func, Y0, T01, method="rk4", options={"grid_constructor": grid_constructor})
    assert seen["func"] is func and seen["y0"] is Y0
    torch.testing.assert_close(seen["t"], T01)


@pytest.mark.parametrize("options,match", [
    ({"first_step": -0.1}, "option 'first_step' of 'dopri5' must be a positive finite number"),
    ({"max_num_steps": 0}, "option 'max_num_steps' of 'dopri5' must be a positive int, got 0"),
    ({"max_num_steps": 10.5}, "option 'max_num_steps' of 'dopri5' must be a positive int"),
    ({"min_step": 1.0, "max_step": 0.1}, "min_step=1.0 exceeds max_step=0.1"),
    ({"min_step": -1.0}, "option 'min_step' of 'dopri5' must be a non-negative"),
    ({"norm": 3}, "option 'norm' of 'dopri5' must be a callable"),
    ({"ifactor": 0.5}, "need ifactor >= 1"),
    ({"safety": 0.0}, "option 'safety' of 'dopri5' must be a positive finite number"),
    ({"step_t": [0.5, math.nan]}, "option 'step_t' of 'dopri5' contains non-finite times"),
    ({"jump_t": "soon"}, "option 'jump_t' of 'dopri5' must be a 1-D tensor or sequence"),
])
def test_bad_adaptive_options(options, match):
    raises_early(ODEInputError, match, method="dopri5", options=options)


@pytest.mark.parametrize("options,match", [
    ({"step_size": 0.1, "max_order": 13},
     "option 'max_order' of 'explicit_adams' must be an int in 1..12, got 13"),
    ({"step_size": 0.1, "max_order": 0},
     "option 'max_order' of 'explicit_adams' must be an int in 1..12, got 0"),
])
def test_bad_adams_options(options, match):
    with pytest.raises(ODEInputError, match=match):
        odeint(lambda t, y: -y, Y0, T01, method="explicit_adams", options=options)


def test_bad_implicit_adams_iterations():
    raises_early(ODEInputError, "option 'max_iters' of 'implicit_adams' must be a positive int, "
                                "got 0", method="implicit_adams",
                 options={"step_size": 0.1, "max_iters": 0})


# -- tolerances --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [-1e-3, math.nan, math.inf])
def test_tolerance_must_be_non_negative_and_finite(name, value):
    raises_early(ODEInputError, f"{name} must be a non-negative finite number, got",
                 **{name: value})


def test_tolerance_must_not_require_grad():
    raises_early(ODEInputError, "rtol must not require grad",
                 rtol=torch.tensor(1e-3, requires_grad=True))


def test_tolerance_tensor_must_broadcast_to_the_state():
    raises_early(ODEInputError, r"atol of shape \(3,\) does not broadcast to the state's shape "
                                r"\(2,\)", atol=torch.tensor([1e-3, 1e-4, 1e-5]))


def test_tolerance_sequence_for_a_tuple_state_needs_one_value_per_element():
    raises_early(ODEInputError, "rtol given as a sequence of 3 values.*2 here",
                 y0=(Y0, Y0), rtol=[1e-3, 1e-4, 1e-5])


def test_negative_element_of_a_tolerance_sequence_is_named():
    raises_early(ODEInputError, r"atol\[1\] must be a non-negative finite number, got -1",
                 y0=(Y0, Y0), atol=[1e-6, -1.0])


# -- y0 and func ---------------------------------------------------------------------------

@pytest.mark.parametrize("y0", [torch.tensor([1, 2]), torch.tensor([True, False])])
def test_y0_must_be_floating(y0):
    raises_early(ODEInputError, r"y0 must have a floating or complex dtype .*got "
                                r"torch\.(int64|bool)", y0=y0)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_y0_must_be_finite(value):
    raises_early(ODEInputError, r"y0 contains non-finite values",
                 y0=torch.tensor([1.0, value], dtype=F64))
    raises_early(ODEInputError, r"y0\[1\] contains non-finite values",
                 y0=(Y0, torch.tensor([value], dtype=F64)))


def test_y0_must_be_a_tensor_or_tuple_of_tensors():
    raises_early(ODEInputError, r"y0\[0\] must be a torch\.Tensor, got float", y0=[1.0, 2.0])
    raises_early(ODEInputError, "y0 is an empty tuple", y0=())


def test_complex_y0_mixed_with_real_in_a_tuple_is_rejected():
    # complex states are solved (tests/test_complex.py); a tuple shares one dtype
    raises_early(ODEInputError, r"share dtype and device.*y0\[1\] is torch\.complex128",
                 y0=(Y0, Y0.to(torch.complex128)))


def test_tuple_y0_must_share_dtype():
    raises_early(ODEInputError, r"share dtype and device.*y0\[1\] is torch\.float32",
                 y0=(Y0, Y0.float()))


def test_func_must_be_callable():
    with pytest.raises(ODEInputError, match=r"func must be a callable.*got int"):
        odeint(3, Y0, T01)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_func_returning_wrong_shape(method):
    opts = {"step_size": 0.1} if method == "rk4" else None
    with pytest.raises(ODEFuncError, match=r"at t=0 returned shape \(3,\), but the state has "
                                           r"shape \(2,\)"):
        odeint(lambda t, y: torch.zeros(3, dtype=F64), Y0, T01, method=method, options=opts)


def test_func_returning_wrong_dtype():
    with pytest.raises(ODEFuncError, match=r"returned dtype torch\.float32, but the state has "
                                           r"dtype torch\.float64"):
        odeint(lambda t, y: (-y).float(), Y0, T01)


def test_func_returning_wrong_tuple_length():
    with pytest.raises(ODEFuncError, match=r"must return a tuple of 2 tensors .* got tuple of "
                                           r"length 1"):
        odeint(lambda t, s: (s[0],), (Y0, Y0), T01)


def test_func_returning_a_tensor_for_a_tuple_state():
    with pytest.raises(ODEFuncError, match=r"must return a tuple of 2 tensors .* got Tensor"):
        odeint(lambda t, s: s[0], (Y0, Y0), T01)


def test_func_returning_wrong_shape_in_a_tuple_element():
    with pytest.raises(ODEFuncError, match=r"element 1, returned shape \(1,\), but the state "
                                           r"has shape \(2,\)"):
        odeint(lambda t, s: (s[0], s[1][:1]), (Y0, Y0), T01)


def test_a_tuple_states_output_check_reads_the_time_only_for_its_error_message():
    # every evaluation of a tuple state's f is checked: the check must not read the time
    # (float(t): a wait for the device at every evaluation) unless it reports an error
    from neuralode.problem import prepare

    class NoFloat(torch.Tensor):
        def __float__(self):
            raise AssertionError("float(t) on the checked path")
    p = prepare(lambda t, s: s, (Y0, Y0), rtol=1e-6, atol=1e-6, method="dopri5", options=None)
    tt = torch.tensor(0.5, dtype=torch.float64).as_subclass(NoFloat)
    p.rhs._check((Y0, Y0), tt)
    with pytest.raises(ODEFuncError, match=r"at t=0\.5, element 1, returned shape \(1,\)"):
        p.rhs._check((Y0, Y0[:1]), torch.tensor(0.5, dtype=torch.float64))


def test_func_returning_none():
    with pytest.raises(ODEFuncError, match="must return a tensor, got NoneType"):
        odeint(lambda t, y: None, Y0, T01)


# -- failures during the solve -------------------------------------------------------------

def test_blow_up_gives_step_size_underflow_naming_the_time():
    # y' = y^2, y(0) = 1 has y = 1 / (1 - t): it blows up at t = 1
    with pytest.raises(StepSizeError) as info:
        odeint(lambda t, y: y**2, torch.tensor([1.0], dtype=F64),
               torch.tensor([0.0, 2.0], dtype=F64))
    msg = str(info.value)
    assert "step size underflow at t=1.0000" in msg
    assert "50.0% of the way from t0=0.0 to t1=2.0" in msg


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8"])
def test_non_finite_derivative_during_an_adaptive_solve_names_the_time(method):
    def func(t, y):
        return -y if t < 0.5 else y * math.nan

    with pytest.raises(FloatingPointError, match=r"non-finite \(nan/inf\) at t=0\.5"):
        odeint(func, torch.tensor([1.0], dtype=F64), T01, method=method)


# f is infinite from t = 0.45 on: rk4 meets it inside the step from 0.4 (stage at
# 0.4667), implicit_adams in its corrector at 0.5; euler and explicit_adams only evaluate
# f at grid points and first use f(0.5) in the step from 0.5
@pytest.mark.parametrize("method,start", [("rk4", 0.4), ("implicit_adams", 0.4),
                                          ("euler", 0.5), ("explicit_adams", 0.5)])
def test_non_finite_derivative_on_a_fixed_grid_names_the_steps(method, start):
    # fixed grids check for nan/inf every few steps: the message brackets the bad step and
    # throw=False returns the last state that was checked finite
    def func(t, y):
        return -y if t < 0.45 else y * math.inf

    with pytest.raises(FloatingPointError, match=r"non-finite \(nan/inf\) between t=") as info:
        odeint(func, torch.tensor([1.0], dtype=F64), T01, method=method,
               options={"step_size": 0.1})
    a, b = (float(v) for v in
            re.search(r"between t=([\d.e+-]+) and t=([\d.e+-]+)", str(info.value)).groups())
    assert a <= start < b and b - a <= 0.8 + 1e-9
    sol = solve(func, torch.tensor([1.0], dtype=F64), T01, method=method,
                options={"step_size": 0.1}, throw=False)
    assert sol.status == "nonfinite" and sol.t_final == a
    assert bool(torch.isfinite(sol.y_final).all())


def test_non_finite_derivative_at_the_start():
    with pytest.raises(FloatingPointError, match=r"non-finite .* at t=0"):
        odeint(lambda t, y: y / 0.0, torch.tensor([1.0], dtype=F64), T01)


def test_max_num_steps_exceeded_says_how_far_it_got():
    with pytest.raises(MaxStepsError, match=r"max_num_steps=5 exceeded at t=0\.\d+, \d+\.\d% of "
                                            r"the way from t0=0\.0 to t1=10\.0"):
        odeint(lambda t, y: -y, Y0, torch.tensor([0.0, 10.0], dtype=F64), method="dopri5",
               options={"max_num_steps": 5})
