"""`neuralode train stiff`: the data, the standard errors, and tiny training runs.

The tiny runs use a shortened span (t up to 0.05) on which an explicit method manages the
Robertson system, so that they stay fast and need no particular stiff method; the full
command (RESULTS.md) uses the default stiff method over [1e-4, 1e5].
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from neuralode import odeint
from neuralode.cli import main
from neuralode.experiments import stiff as exp
from neuralode.experiments.runner import load_checkpoint
from neuralode.problems import Robertson

F64 = torch.float64
TINY = ["--method", "dopri5", "--t-min", "1e-3", "--t-max", "0.05", "--n-obs", "6", "--rtol",
        "1e-5", "--atol", "1e-10", "--eval-every", "2", "--ckpt-every", "2", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_observations_are_the_true_solution_with_seeded_relative_noise():
    a = exp.make_observations(8, 1e-3, 0.1, noise=0.05, seed=3)
    b = exp.make_observations(8, 1e-3, 0.1, noise=0.05, seed=3)
    c = exp.make_observations(8, 1e-3, 0.1, noise=0.05, seed=4)
    assert torch.equal(a.noisy, b.noisy) and not torch.equal(a.noisy, c.noisy)
    torch.testing.assert_close(a.t, torch.logspace(-3, -1, 8, dtype=F64))
    torch.testing.assert_close(a.clean.sum(-1), torch.ones(8, dtype=F64), rtol=1e-10, atol=0)
    ratio = torch.log(a.noisy / a.clean)  # log-normal: N(0, noise^2)
    assert 0.03 < float(ratio.std()) < 0.07 and bool((a.noisy > 0).all())
    clean = exp.make_observations(8, 1e-3, 0.1, noise=0.0)
    assert torch.equal(clean.noisy, clean.clean)


def test_initial_guess_is_within_the_spread_and_seeded():
    true = torch.log(torch.tensor(exp.TRUE_K, dtype=F64))
    for seed in range(5):
        off = (exp.initial_guess(1.0, seed) - true) / math.log(10.0)
        assert bool((off.abs() <= 1.0).all())
    assert torch.equal(exp.initial_guess(1.0, 7), exp.initial_guess(1.0, 7))
    torch.testing.assert_close(exp.initial_guess(0.0, 1), true, rtol=0, atol=0)


def test_std_errors_agree_with_autograd_sensitivities_of_our_solver():
    data = exp.make_observations(4, 1e-3, 0.01, noise=0.01, seed=0)
    log_k = torch.log(torch.tensor(exp.TRUE_K, dtype=F64))
    times = torch.cat([torch.zeros(1, dtype=F64), data.t])

    def residuals(lk):
        model = Robertson(*lk.exp().unbind())
        ys = odeint(model, model.initial_state(), times, rtol=1e-9, atol=1e-15)[1:]
        return (ys.log() / 0.01).reshape(-1)

    J = torch.autograd.functional.jacobian(residuals, log_k)
    se_autograd = torch.linalg.inv(J.T @ J).diagonal().sqrt()
    torch.testing.assert_close(exp.std_errors(log_k, data, 0.01), se_autograd, rtol=1e-3,
                               atol=0)


def test_maximum_likelihood_recovers_the_truth_from_noise_free_data():
    data = exp.make_observations(6, 1e-3, 0.1, noise=0.0)
    true = torch.log(torch.tensor(exp.TRUE_K, dtype=F64))
    start = true + torch.tensor([0.02, -0.02, 0.03], dtype=F64)
    mle, se, loss = exp.maximum_likelihood(start, data, noise=0.01)
    torch.testing.assert_close(mle, true, rtol=0, atol=1e-6)
    assert loss < 1e-8 and bool((se > 0).all())


def test_loss_falls_and_the_constants_approach_the_truth(tmp_path):
    # noise-free data, 30 Adam steps on the short span: the fit must improve a lot (k3 is
    # weakly determined by t <= 0.05, so only k1 and k2 are checked)
    rc = main(["train", "stiff", *TINY, "--iters", "30", "--lr", "0.1", "--noise", "0",
               "--init-spread", "0.3", "--no-plot", "--out", str(tmp_path)])
    assert rc == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    first, last = m["history_loss_first_last"]
    assert last < 0.1 * first
    start = [abs(k0 / k - 1) for k0, k in zip(m["initial_k"], m["true_k"])]
    assert m["k1_rel_err"] < 0.5 * start[0] and m["k2_rel_err"] < 0.5 * start[1]


def test_train_command_tiny_run(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "stiff", *TINY, "--iters", "3", "--mle-steps", "1", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["method"] == "dopri5" and m["config"]["gradient"] == "backprop"
    for k in ("final_loss", "k1_rel_err", "k2_rel_err", "k3_rel_err", "fit_max_rel_err_vs_truth"):
        assert math.isfinite(m[k]), k
    assert len(m["std_err_log_k"]) == 3 and all(v > 0 for v in m["std_err_log_k"])
    assert len(m["mle_k"]) == 3 and math.isfinite(m["mle_loss"])
    lines = (out / "metrics.csv").read_text().strip().splitlines()
    assert lines[0].startswith("iter,loss,lr,elapsed_s,k1,k1_rel_err") and len(lines) == 4
    assert "nfe" in lines[0]
    assert (out / "stiff.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "Robertson rate constants, dopri5 (backprop)" in text and "recovered" in text


def test_train_command_resume_continues_exactly(tmp_path):
    args = ["train", "stiff", *TINY, "--iters", "4", "--no-plot", "--noise", "0"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--stop-after", "2"]) == 0
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 2
    assert main(args + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert torch.equal(a["model"]["constants_param"], b["model"]["constants_param"])
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]


def test_train_command_errors(tmp_path, capsys):
    base = ["train", "stiff", *TINY, "--iters", "2", "--out", str(tmp_path), "--no-plot"]
    assert main(base + ["--t-min", "1.0", "--t-max", "0.5"]) == 2
    assert "--t-min (1) must be smaller than --t-max (0.5)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # checked while parsing, before any work
        main(base + ["--method", "kvaerno99"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method 'kvaerno99'" in err and "Traceback" not in err
    assert main(base + ["--rtol", "1e-17"]) == 2
    assert "--rtol 1e-17 is below what float64 can resolve" in capsys.readouterr().err


def test_adjoint_and_backprop_training_agree(tmp_path):
    finals = {}
    for grad in ("backprop", "adjoint"):
        out = tmp_path / grad
        args = ["train", "stiff", *TINY, "--rtol", "1e-8", "--atol", "1e-14", "--iters", "2",
                "--noise", "0", "--no-plot", "--gradient", grad, "--out", str(out)]
        assert main(args) == 0
        finals[grad] = json.loads((out / "metrics.json").read_text())
    # Adam's first steps move each log k by about lr whatever the gradient's size, so the
    # constants agree only if the two gradients have the same signs; the losses must agree
    # closely (same data, same tolerances)
    for name in ("k1", "k2", "k3"):
        assert finals["adjoint"][name] == pytest.approx(finals["backprop"][name], rel=1e-6)
    assert finals["adjoint"]["final_loss"] == pytest.approx(finals["backprop"]["final_loss"],
                                                            rel=1e-4)
