"""Tests for dynamics recovery: the true fields, the data, training and `train dynamics`."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch

from neuralode import odeint
from neuralode.cli import main
from neuralode.experiments import dynamics as exp
from neuralode.experiments.runner import load_checkpoint
from neuralode.models.dynamics import (
    LinearField,
    LinearODEFunc,
    MLPODEFunc,
    TwoRegimeField,
    make_field_model,
    make_true_field,
    vector_field_error,
)

TINY = ["--n-points", "200", "--batch-size", "4", "--batch-time", "8", "--hidden", "16",
        "--eval-every", "2", "--ckpt-every", "2", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    exp.build_parser(p)
    return p.parse_args(list(argv))


# ------------------------------------------------------------------ fields and data


def test_spiral_trajectory_matches_matrix_exponential():
    data = exp.make_trajectory("spiral", n_points=50, t_max=6.0, noise_std=0.0)
    A = torch.tensor([[-0.1, -1.0], [1.0, -0.1]], dtype=torch.float64)
    exact = torch.stack([torch.linalg.matrix_exp(A * float(t)) @ data.z0.double()
                         for t in data.t])
    torch.testing.assert_close(data.clean.double(), exact, rtol=1e-5, atol=1e-6)
    assert torch.equal(data.clean, data.noisy)


def test_two_regime_field_formula_and_limits():
    f = TwoRegimeField()
    A, B, x0 = f.A, f.B, f.x0
    z = torch.tensor([[0.3, -1.2], [2.5, 0.7], [-1.0, 4.0]])
    s = torch.sigmoid(z @ x0)[:, None]
    expected = s * (z - x0) @ A.T + (1 - s) * (z + x0) @ B.T
    torch.testing.assert_close(f(torch.zeros(()), z), expected)
    far_pos, far_neg = torch.tensor([[40.0, 1.0]]), torch.tensor([[-40.0, 1.0]])
    torch.testing.assert_close(f(0, far_pos), (far_pos - x0) @ A.T)
    torch.testing.assert_close(f(0, far_neg), (far_neg + x0) @ B.T)
    assert not torch.allclose(A, B)


def test_two_regime_trajectory_visits_both_regimes():
    data = exp.make_trajectory("two-regime", n_points=400, noise_std=0.0)
    side = data.clean @ make_true_field("two-regime").x0 > 0
    assert 0.2 < side.float().mean() < 0.8


def test_noise_reproducible_by_seed():
    a = exp.make_trajectory("spiral", n_points=300, noise_std=0.05, seed=3)
    b = exp.make_trajectory("spiral", n_points=300, noise_std=0.05, seed=3)
    c = exp.make_trajectory("spiral", n_points=300, noise_std=0.05, seed=4)
    assert torch.equal(a.noisy, b.noisy) and not torch.equal(a.noisy, c.noisy)
    std = float((a.noisy - a.clean).std())
    assert 0.04 < std < 0.06
    assert bool((a.t[1:] > a.t[:-1]).all())


def test_sample_batch_windows_are_consistent():
    data = exp.make_trajectory("spiral", n_points=100, noise_std=0.05)
    g = torch.Generator().manual_seed(0)
    y0, t_rel, target = exp.sample_batch(data, 7, 5, g)
    assert y0.shape == (7, 2) and t_rel.shape == (5,) and target.shape == (5, 7, 2)
    assert float(t_rel[0]) == 0.0
    torch.testing.assert_close(target[0], y0)
    # consecutive noisy observations of the trajectory
    for j in range(7):
        i = int((data.noisy == y0[j]).all(-1).nonzero()[0])
        torch.testing.assert_close(target[:, j], data.noisy[i:i + 5])


def test_vector_field_error():
    true = LinearField()
    low, high = torch.tensor([-2.0, -2.0]), torch.tensor([2.0, 2.0])
    zero = vector_field_error(true, true, low, high, near=torch.zeros(1, 2))
    assert zero["rmse"] == 0.0 and zero["rel_rmse"] == 0.0 and zero["near_rel_rmse"] == 0.0
    scaled = LinearField(A=1.1 * true.A)
    err = vector_field_error(scaled, true, low, high)
    assert err["rel_rmse"] == pytest.approx(0.1, rel=1e-4)
    with pytest.raises(ValueError, match="high > low"):
        vector_field_error(true, true, high, low)


def test_models_and_bad_names():
    assert isinstance(make_field_model("linear"), LinearODEFunc)
    assert isinstance(make_field_model("mlp", hidden=8), MLPODEFunc)
    with pytest.raises(ValueError, match="unknown model 'cnn'; valid models are: linear, mlp"):
        make_field_model("cnn")
    with pytest.raises(ValueError, match="unknown field 'lorenz'; valid fields are: spiral, "
                                         "two-regime"):
        make_true_field("lorenz")
    with pytest.raises(ValueError, match="unknown field"):
        exp.make_trajectory("lorenz")


def test_adjoint_and_backprop_gradients_agree():
    from neuralode import odeint_adjoint

    data = exp.make_trajectory("two-regime", n_points=200)
    y0, t_rel, target = exp.sample_batch(data, 3, 10, torch.Generator().manual_seed(1))
    grads = []
    for integrate in (odeint, odeint_adjoint):
        torch.manual_seed(0)
        model = MLPODEFunc(2, hidden=8).double()
        pred = integrate(model, y0.double(), t_rel.double(), rtol=1e-9, atol=1e-10)
        ((pred - target.double()) ** 2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ training


def test_linear_model_recovers_spiral_matrix(tmp_path):
    m = exp.train(_args("--model", "linear", "--iters", "120", "--lr", "0.05", "--gradient",
                        "backprop", "--batch-time", "20", "--batch-stride", "1", "--n-points",
                        "300", "--out", str(tmp_path), "--no-plot", "--quiet", "--eval-every",
                        "120", "--ckpt-every", "120"))
    learned = torch.tensor(m["learned_A"])
    true = torch.tensor([[-0.1, -1.0], [1.0, -0.1]])
    assert float((learned - true).abs().max()) < 0.05
    assert m["traj_mse"] < 0.1 * m["initial_traj_mse"]
    assert m["field_rel_err"] < 0.05


def test_train_command_tiny_run(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "dynamics", "--field", "two-regime", "--model", "mlp", "--iters", "4",
               "--out", str(out)] + TINY)
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for k in ("traj_mse", "traj_mse_obs", "field_rel_err", "field_rel_err_near"):
        assert math.isfinite(m[k]), k
    assert m["config"]["gradient"] == "adjoint"  # the default
    lines = (out / "metrics.csv").read_text().strip().splitlines()
    assert lines[0].startswith("iter,loss") and len(lines) == 5
    assert (out / "dynamics.png").stat().st_size > 1000
    assert (out / "checkpoint.pt").is_file() and not (out / "checkpoint.pt.tmp").exists()
    assert "trajectory MSE vs clean truth" in capsys.readouterr().out


def test_train_command_resume_continues_exactly(tmp_path):
    args = ["train", "dynamics", "--iters", "6", "--gradient", "backprop", "--no-plot"] + TINY
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--stop-after", "3"]) == 0
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 3
    assert main(args + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


def test_train_command_errors(tmp_path, capsys):
    base = ["train", "dynamics", "--iters", "2", "--out", str(tmp_path), "--no-plot"] + TINY
    assert main(base + ["--batch-time", "300", "--batch-stride", "1"]) == 2
    assert "spans 300 points, more than --n-points (200)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # checked while parsing, before any work
        main(base + ["--method", "rk45"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method 'rk45'" in err and "dopri5" in err and "Traceback" not in err
    assert main(base + ["--device", "tpu"]) == 2
    assert "valid devices here are: cpu" in capsys.readouterr().err
    assert main(base + ["--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--field", "lorenz"])


def test_train_command_compile_flag_reaches_the_eager_numbers(tmp_path):
    """--compile: the training solves (adjoint: compiled forward) and the evaluation solves
    run as compiled loops and end where the eager run ends."""
    base = ["train", "dynamics", "--iters", "2", "--no-plot"] + TINY
    assert main(base + ["--out", str(tmp_path / "eager")]) == 0
    assert main(base + ["--out", str(tmp_path / "compiled"), "--compile"]) == 0
    e = json.loads((tmp_path / "eager" / "metrics.json").read_text())
    c = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    for k in ("final_loss", "traj_mse", "field_rel_err", "initial_traj_mse"):
        assert c[k] == pytest.approx(e[k], rel=1e-4), k
    help_text = subprocess.run([sys.executable, "-m", "neuralode", "train", "dynamics", "--help"],
                               capture_output=True, text=True).stdout
    assert "--compile" in help_text
