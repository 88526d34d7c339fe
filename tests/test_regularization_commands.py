"""Tiny-budget runs of the training commands' regularisation flags (issue 21): --kinetic,
--jacobian-frobenius, --second-derivative, --steer, --augment-dims; NFE per step in the
metrics and the nfe.png plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from neuralode.cli import main
from neuralode.experiments.regularization import build_regularizers, regularization_label

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
REGS = ["--kinetic", "0.01", "--jacobian-frobenius", "0.01", "--second-derivative", "0.001"]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_flags_build_the_regularisers_and_label():
    cfg = {"kinetic": 0.01, "jacobian_frobenius": 0.0, "second_derivative": 0.5,
           "steer": 0.25}
    regs = build_regularizers(cfg)
    assert [(r.name, r.weight) for r in regs] == [("kinetic", 0.01), ("second_derivative", 0.5)]
    assert regularization_label(cfg) == "kinetic 0.01 + second-derivative 0.5 + steer 0.25"
    assert build_regularizers({}) == [] and regularization_label({}) == "none"


def test_compile_with_regularisers_is_refused_before_any_work(tmp_path, capsys):
    """--compile, a regulariser and an adaptive method: a clear error naming the flags,
    before the run starts (the library's regularized_solve refuses options['compile'] with
    error_control='state' for the adaptive methods too); a fixed grid compiles, and gives
    the eager solve's states and integrals."""
    import argparse

    import torch

    import neuralode
    from neuralode.experiments.regularization import check_compile
    from neuralode.regularizers import KineticEnergy, regularized_solve
    rc = main(["train", "cnf", "--data", "moons", "--iters", "1", "--compile", "--kinetic",
               "0.01", "--second-derivative", "0.1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "--compile cannot run the regularisers (--kinetic, " \
        "--second-derivative) with the adaptive method dopri5" in err
    assert not (tmp_path / "r").exists()
    compiled = argparse.Namespace(compile=True)
    check_compile({"kinetic": 0.01, "method": "rk4"}, compiled)  # a fixed grid: no error
    check_compile({"kinetic": 0.01, "method": "dopri5"}, argparse.Namespace(compile=False))
    check_compile({"kinetic": 0.0, "method": "dopri5"}, compiled)
    f, y0 = (lambda t, y: -y * y), torch.ones(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    with pytest.raises(neuralode.ODEInputError, match="error_control='all'"):
        regularized_solve(f, y0, t, [KineticEnergy()], options={"compile": True})
    with torch.no_grad():
        eager = regularized_solve(f, y0, t, [KineticEnergy()], method="rk4",
                                  options={"step_size": 0.1})
        comp = regularized_solve(f, y0, t, [KineticEnergy()], method="rk4",
                                 options={"step_size": 0.1, "compile": "aot_eager"})
    assert comp.solution.stats.n_accepted == eager.solution.stats.n_accepted == 10
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-12, atol=0)
    torch.testing.assert_close(comp.integrals["kinetic"], eager.integrals["kinetic"],
                               rtol=1e-12, atol=0)
    assert (comp.integrals["kinetic"] > 0).all()


def test_train_cnf_with_regularisers_and_steer(tmp_path):
    out = tmp_path / "cnf"
    rc = main(["train", "cnf", "--data", "moons", "--iters", "3", "--hidden", "8",
               "--batch-size", "32", "--test-size", "64", "--rtol", "1e-3", "--atol", "1e-3",
               "--steer", "0.2", "--jacobian-estimator", "exact", *REGS, "--grid", "8",
               "--plot-samples", "100", "--out", str(out), "--threads", "1"])
    assert rc == 0
    rows = _rows(out / "metrics.csv")
    assert len(rows) == 3
    for r in rows:
        assert int(r["nfe_forward"]) > 0
        assert float(r["kinetic"]) > 0 and float(r["jacobian_frobenius"]) > 0
        assert float(r["second_derivative"]) >= 0
        assert 0.3 <= float(r["solve_end_time"]) <= 0.7  # T = 0.5 +- 0.2
        assert float(r["loss"]) > float(r["nll"])  # the regularisation is in the loss
    final = json.loads((out / "metrics.json").read_text())
    assert final["regularization"].startswith("kinetic 0.01 + jacobian 0.01")
    assert (out / "nfe.png").stat().st_size > 0


def test_train_cnf_refuses_steer_not_below_t1(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "cnf", "--steer", "-1", "--out", str(tmp_path)])
    rc = main(["train", "cnf", "--steer", "0.5", "--t1", "0.5", "--iters", "1",
               "--out", str(tmp_path / "x")])
    assert rc != 0
    assert "--steer must be smaller than --t1" in capsys.readouterr().err


def test_train_mnist_odenet_with_regularisers_steer_and_augmented_channels(tmp_path):
    out = tmp_path / "mnist"
    rc = main(["train", "mnist", "--train-split", "train-5k", "--train-limit", "64",
               "--test-limit", "32", "--batch-size", "32", "--data-dir", str(SHARED),
               "--threads", "1", "--model", "odenet", "--width", "8", "--method", "rk4",
               "--step-size", "0.5", "--epochs", "1", "--kinetic", "0.01",
               "--jacobian-frobenius", "0.01", "--steer", "0.3", "--augment-dims", "4",
               "--out", str(out)])
    assert rc == 0
    steps = _rows(out / "nfe_steps.csv")
    assert [int(r["step"]) for r in steps] == [1, 2]
    assert all(int(r["nfe_forward"]) > 0 and int(r["nfe_backward"]) > 0 for r in steps)
    final = json.loads((out / "metrics.json").read_text())
    assert final["nfe_forward_last10_steps"] > 0
    assert final["regularization"] == "kinetic 0.01 + jacobian 0.01 + steer 0.3 + augment 4"
    assert (out / "nfe.png").stat().st_size > 0


def test_train_mnist_refuses_regularisers_for_models_without_an_ode(tmp_path, capsys):
    rc = main(["train", "mnist", "--model", "mlp", "--kinetic", "0.1", "--train-split",
               "train-5k", "--data-dir", str(SHARED), "--out", str(tmp_path)])
    assert rc != 0
    assert "--kinetic" in capsys.readouterr().err


def test_train_dynamics_with_regularisers(tmp_path):
    out = tmp_path / "dyn"
    rc = main(["train", "dynamics", "--iters", "3", "--eval-every", "3", "--n-points", "100",
               "--batch-size", "4", "--hidden", "8", *REGS, "--out", str(out)])
    assert rc == 0
    rows = _rows(out / "metrics.csv")
    assert all(int(r["nfe_forward"]) > 0 and float(r["kinetic"]) > 0 for r in rows)
    assert (out / "nfe.png").stat().st_size > 0


def test_train_latent_ode_with_regularisers(tmp_path):
    out = tmp_path / "lat"
    rc = main(["train", "latent-ode", "--iters", "3", "--n-spirals", "16", "--n-total", "60",
               "--n-obs", "12", "--batch-size", "6", "--latent-dim", "3", "--enc-hidden", "8",
               "--ode-hidden", "8", "--eval-every", "3", "--quiet", *REGS,
               "--out", str(out)])
    assert rc == 0
    rows = _rows(out / "metrics.csv")
    assert all(int(r["nfe_forward"]) > 0 and float(r["jacobian_frobenius"]) > 0 for r in rows)
    assert (out / "nfe.png").stat().st_size > 0
