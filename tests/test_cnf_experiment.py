"""`neuralode train cnf` and `neuralode analyze cnf-compare` on tiny budgets (issue 6)."""

from __future__ import annotations

import csv
import json
import math
import warnings

import pytest
import torch

from neuralode.cli import main
from neuralode.experiments.runner import load_checkpoint

TINY_CNF = ["--dynamics", "hypernet", "--width", "4", "--hyper-hidden", "8", "--rtol", "1e-3",
            "--atol", "1e-3", "--batch-size", "64", "--test-size", "200", "--grid", "16",
            "--plot-samples", "2000"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_train_cnf_tiny_run_writes_metrics_checkpoint_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "cnf", "--data", "8gaussians", "--iters", "3", "--out", str(out),
               *TINY_CNF])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = _rows(out / "metrics.csv")
    assert [int(r["iter"]) for r in rows] == [1, 2, 3]
    assert math.isfinite(metrics["test_nll"])
    assert metrics["test_nll"] == pytest.approx(float(rows[-1]["test_nll"]))
    assert metrics["test_nll"] > metrics["true_nll"] > 0  # no model beats the data's entropy
    assert all(int(r["nfe_forward"]) > 0 for r in rows)
    # hypernetwork 1 -> 8 -> 8 -> 3*M*D + M with M = 4, D = 2
    assert metrics["params"] == (8 + 8) + (64 + 8) + (8 * 28 + 28)
    for name in ("checkpoint.pt", "density.png", "evolution.png"):
        assert (out / name).stat().st_size > 0
    assert "3/3" in capsys.readouterr().err


def test_train_planar_tiny_run(tmp_path):
    out = tmp_path / "planar"
    rc = main(["train", "cnf", "--data", "moons", "--model", "planar", "--layers", "4",
               "--iters", "5", "--lr", "1e-2", "--test-size", "200", "--grid", "16",
               "--out", str(out), "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["params"] == 4 * 5 and math.isfinite(metrics["test_nll"])
    assert metrics["mean_nfe_forward"] is None
    assert (out / "density.png").exists() and not (out / "evolution.png").exists()


def test_resume_after_interruption_continues_exactly(tmp_path, monkeypatch):
    import neuralode.experiments.cnf as exp

    args = ["--data", "moons", "--estimator", "hutchinson", "--noise", "rademacher",
            "--lr-schedule", "cosine", "--iters", "4", "--ckpt-every", "2", "--no-plot",
            "--quiet", *TINY_CNF]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "cnf", *args, "--out", str(full)]) == 0

    real_sample, calls = exp.sample_toy2d, []

    def interrupted(*a, **k):  # call 1 is the test set, then one per iteration
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_sample(*a, **k)

    monkeypatch.setattr(exp, "sample_toy2d", interrupted)
    assert main(["train", "cnf", *args, "--out", str(part)]) == 130  # as after Ctrl-C
    assert load_checkpoint(part / "checkpoint.pt")["step"] == 2
    monkeypatch.setattr(exp, "sample_toy2d", real_sample)
    assert main(["train", "cnf", *args, "--out", str(part), "--resume"]) == 0

    a = load_checkpoint(full / "checkpoint.pt")
    b = load_checkpoint(part / "checkpoint.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    assert [r["iter"] for r in _rows(part / "metrics.csv")] == ["1", "2", "3", "4"]


def test_resume_with_different_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "cnf", "--data", "moons", "--model", "planar", "--layers", "2",
            "--iters", "2", "--test-size", "50", "--no-plot", "--quiet", "--out", str(out)]
    assert main(base) == 0
    assert main(base + ["--resume", "--lr", "1e-2"]) == 2
    assert "--lr 0.001 -> 0.01" in capsys.readouterr().err


def test_bad_arguments_are_rejected_with_the_valid_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "cnf", "--data", "spiral", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "8gaussians" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # checked while parsing, before any work
        main(["train", "cnf", "--method", "rk45", "--iters", "1", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'rk45'" in err and "dopri5" in err
    with pytest.raises(SystemExit):
        main(["train", "cnf", "--hidden", "64,-1", "--out", str(tmp_path)])
    assert "64,-1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# density matching
# ---------------------------------------------------------------------------------------------


def test_log_partition_of_boxed_u2_matches_closed_form():
    from neuralode.experiments.cnf_compare import WALL, log_partition

    # Along z2 a Gaussian of std 0.4 (all its mass inside the box); along z1 the flat box of
    # width 8 plus two half-Gaussian walls of std WALL.
    expected = math.log(math.sqrt(2 * math.pi) * 0.4 * (8.0 + math.sqrt(2 * math.pi) * WALL))
    assert log_partition("u2") == pytest.approx(expected, abs=2e-3)


def test_cnf_compare_tiny_run_writes_table_plots_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    args = ["analyze", "cnf-compare", "--targets", "u1", "--iters-planar", "3",
            "--iters-cnf", "2", "--eval-samples", "64", "--batch-size", "32", "--grid", "12",
            "--hyper-hidden", "4", "--rtol", "1e-3", "--atol", "1e-3", "--quiet",
            "--out", str(out)]
    assert main([*args, "--sizes", "1"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(runs) == ["u1/cnf/1", "u1/planar/1"]
    assert all(math.isfinite(r["kl"]) and r["kl"] > -0.5 for r in runs.values())
    assert "| u1 |" in (out / "table.md").read_text()
    assert (out / "compare.png").exists() and (out / "kl_vs_size.png").exists()

    assert main([*args, "--sizes", "1,2", "--resume", "--no-plot"]) == 0
    again = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(again) == ["u1/cnf/1", "u1/cnf/2", "u1/planar/1", "u1/planar/2"]
    assert again["u1/cnf/1"] == runs["u1/cnf/1"]  # kept, not retrained


def test_compile_backend_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "cnf", "--compile", "no_such_backend", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "unknown torch.compile backend 'no_such_backend'" in err and "inductor" in err


def test_cnf_compare_rejects_unknown_target(tmp_path, capsys):
    rc = main(["analyze", "cnf-compare", "--targets", "u1,u9", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "u9" in err and "u1, u2, u3, u4" in err


def test_train_cnf_with_compile_reaches_the_eager_numbers(tmp_path):
    """--compile (issue 18 item 5): every solve of the run is compiled (the training solves
    with the adjoint, the test log-likelihood's), none falls back to eager, and the metrics
    are the eager run's: loss, test NLL and the evaluations forward and backward."""
    from neuralode.solvers.compiled import CompileFallbackWarning

    args = ["train", "cnf", "--data", "moons", "--iters", "2", "--gradient", "adjoint",
            "--no-plot", "--quiet", *TINY_CNF]
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        # (aot_eager: dynamo's tracing, where the divergence failed, without inductor's
        # compile time; tests/test_mnist_train.py trains with inductor)
        assert main([*args, "--compile", "aot_eager", "--out", str(tmp_path / "compiled")]) == 0
    eager, comp = _rows(tmp_path / "eager" / "metrics.csv"), _rows(tmp_path / "compiled" /
                                                                   "metrics.csv")
    assert len(eager) == len(comp) == 2
    for e, c in zip(eager, comp):
        for k in ("loss", "nll", "test_nll"):
            if e[k]:
                assert float(c[k]) == pytest.approx(float(e[k]), rel=1e-6), k
        for k in ("nfe_forward", "nfe_backward"):
            assert int(c[k]) == int(e[k]) > 0, k


def test_train_cnf_with_adjoint_and_trainable_time(tmp_path):
    out = tmp_path / "adj"
    rc = main(["train", "cnf", "--data", "moons", "--iters", "2", "--gradient", "adjoint",
               "--train-time", "--no-plot", "--quiet", "--out", str(out), *TINY_CNF])
    assert rc == 0
    rows = _rows(out / "metrics.csv")
    assert all(int(r["nfe_backward"]) > 0 for r in rows)  # the adjoint solved backwards
    assert float(rows[-1]["end_time"]) != pytest.approx(0.5, abs=1e-6)  # T was trained
