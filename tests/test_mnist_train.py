"""Tests for `neuralode train mnist` and `neuralode analyze mnist-table1 / mnist-fig3` on tiny
budgets (real images from the offline copy in ../shared/data/mnist)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch

from neuralode.cli import main
from neuralode.experiments import mnist as M
from neuralode.experiments.runner import (
    UsageError,
    format_table,
    load_checkpoint,
    parse_device,
    progress_bar,
    save_checkpoint,
    write_csv,
    write_json,
)
from neuralode.solvers.compiled import CompileFallbackWarning

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
TINY = ["--train-split", "train-5k", "--train-limit", "96", "--test-limit", "64",
        "--batch-size", "32", "--data-dir", str(SHARED), "--threads", "1", "--no-plot"]
# A small ODE-Net: width 8, fixed-grid RK4 with two steps, adjoint gradients.
TINY_ODENET = ["--model", "odenet", "--width", "8", "--method", "rk4", "--step-size", "0.5"]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def train(out: Path, *extra: str) -> int:
    return main(["train", "mnist", *TINY, "--out", str(out), *extra])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- training


def test_tiny_run_writes_metrics_checkpoint_plot_and_summary(tmp_path, capsys):
    out = tmp_path / "mlp"
    rc = main(["train", "mnist", *[a for a in TINY if a != "--no-plot"], "--model", "mlp",
               "--epochs", "2", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["finished"] is True
    assert metrics["params"] == 238510
    assert 0.0 <= metrics["test_error"] <= 1.0
    assert metrics["n_train"] == 96 and metrics["n_test"] == 64
    rows = read_csv(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[-1]["test_error"]) == pytest.approx(metrics["test_error"])
    assert (out / "checkpoint.pt").is_file() and (out / "training.png").is_file()
    captured = capsys.readouterr()
    assert "test err %" in captured.out  # the final summary table
    assert "epoch 1/2" in captured.err and "img/s=" in captured.err  # the progress bar


def test_ode_run_records_forward_and_backward_nfe(tmp_path):
    out = tmp_path / "ode"
    assert train(out, *TINY_ODENET, "--epochs", "1") == 0
    row = read_csv(out / "metrics.csv")[0]
    # RK4 with 2 steps: 8 evaluations forward; the adjoint solves backward on the same grid
    assert float(row["nfe_forward"]) == 8.0
    assert float(row["nfe_backward"]) > 0
    assert float(row["test_nfe_forward"]) == 8.0
    assert json.loads((out / "metrics.json").read_text())["gradient"] == "adjoint"


def test_resume_continues_bit_identically(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = (*TINY_ODENET, "--epochs", "2")
    assert train(straight, *args) == 0
    # stop mid-epoch 2 (3 steps per epoch), then continue
    assert train(resumed, *args, "--max-steps", "4") == 0
    ckpt = load_checkpoint(resumed / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 1, 4)
    assert train(resumed, *args, "--resume") == 0
    a = load_checkpoint(straight / "checkpoint.pt")
    b = load_checkpoint(resumed / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    timing = {"epoch_time_s", "images_per_s", "train_time_s"}
    rows_a, rows_b = read_csv(straight / "metrics.csv"), read_csv(resumed / "metrics.csv")
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows_a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in rows_b]


def test_resume_refuses_changed_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--model", "mlp", "--epochs", "2", "--max-steps", "1") == 0
    assert train(out, "--model", "mlp", "--epochs", "2", "--resume", "--lr", "0.5") == 2
    assert "--lr None -> 0.5" in capsys.readouterr().err


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--model", "mlp", "--epochs", "1") == 0
    assert train(out, "--model", "mlp", "--epochs", "1") == 2
    assert "pass --resume" in capsys.readouterr().err
    assert train(tmp_path / "new", "--model", "mlp", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_missing_data_names_the_download_flag(tmp_path, capsys):
    rc = main(["train", "mnist", "--model", "mlp", "--data-dir", str(tmp_path / "empty"),
               "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing file(s) train-images-idx3-ubyte.gz" in err and "--download" in err


def test_bad_arguments_are_rejected_with_the_valid_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "mnist", "--model", "vgg"])
    assert "invalid choice: 'vgg'" in capsys.readouterr().err
    assert train(tmp_path / "r", "--model", "rknet", "--gradient", "adjoint") == 2
    assert "--model rknet's gradient is the solver's own" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "mnist", "--gradient", "exact"])
    assert "gradient must be one of" in capsys.readouterr().err
    with pytest.raises(UsageError, match="invalid device 'gpu0'; valid devices here are: cpu"):
        parse_device("gpu0")


def test_learning_rate_schedule_scales_the_papers_decays():
    config = {"epochs": 16, "batch_size": 256, "lr": None, "decay_epochs": None,
              "decay_factor": 0.1}
    steps = 10  # per epoch: decays at epochs 6, 10, 14 -> steps 60, 100, 140
    lrs = [M.learning_rate(s, steps, config) for s in (0, 59, 60, 99, 100, 140)]
    assert lrs == pytest.approx([0.2, 0.2, 0.02, 0.02, 0.002, 0.0002])


# --------------------------------------------------------------------------- utilities


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    save_checkpoint({"x": torch.arange(3)}, tmp_path / "c.pt")
    save_checkpoint({"x": torch.arange(4)}, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["x"], torch.arange(4))


def test_metrics_writer_and_table(tmp_path):
    write_csv(tmp_path / "metrics.csv", [{"a": 1, "b": 0.5}, {"a": 2, "c": "x"}])
    assert (tmp_path / "metrics.csv").read_text() == "a,b,c\n1,0.5,\n2,,x\n"
    write_json(tmp_path / "metrics.json", {"test_error": 0.1})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"test_error": 0.1}
    assert format_table([[1, "x"]], ["n", "name"], markdown=True).splitlines()[2] == "| 1 | x    |"


def test_progress_bar_renders_counts_and_postfix(capsys):
    bar = progress_bar(4, desc="ep")
    bar.update(1)
    bar.set_postfix(loss=0.25, refresh=False)
    bar.update(3)
    bar.close()
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("ep: 100%|") and "4/4" in last and "loss=0.25" in last


# --------------------------------------------------------------------------- analyses


def test_table1_measures_memory_and_time_in_fresh_processes(tmp_path):
    runs = tmp_path / "runs"
    assert train(runs / "mlp", "--model", "mlp", "--epochs", "1") == 0
    rc = main(["analyze", "mnist-table1", "--runs", str(runs), "--models", "mlp,resnet",
               "--batch-size", "16", "--steps", "1", "--data-dir", str(SHARED),
               "--out", str(tmp_path / "t1")])
    assert rc == 0
    rows = {r["model"]: r for r in read_csv(tmp_path / "t1" / "table1.csv")}
    assert set(rows) == {"mlp", "resnet"}
    assert rows["mlp"]["test_error_pct"] != "" and rows["resnet"]["test_error_pct"] == ""
    # the ResNet's activations at batch 16 are megabytes; the MLP's far fewer
    assert float(rows["resnet"]["step_memory_mib"]) > float(rows["mlp"]["step_memory_mib"])
    assert float(rows["resnet"]["time_per_step_s"]) > 0
    assert (tmp_path / "t1" / "table1.png").is_file()
    assert "| mlp" in (tmp_path / "t1" / "table1.md").read_text()


def test_fig3_evaluates_a_trained_odenet_at_several_tolerances(tmp_path):
    run = tmp_path / "odenet"
    assert train(run, "--model", "odenet", "--width", "8", "--epochs", "1") == 0
    rc = main(["analyze", "mnist-fig3", "--run", str(run), "--tols", "1e-1,1e-4",
               "--test-limit", "32", "--batch-size", "32", "--backward-batches", "1",
               "--data-dir", str(SHARED), "--out", str(tmp_path / "f3")])
    assert rc == 0
    rows = read_csv(tmp_path / "f3" / "fig3.csv")
    assert [float(r["tol"]) for r in rows] == [1e-1, 1e-4]
    assert float(rows[1]["nfe_forward"]) > float(rows[0]["nfe_forward"])
    assert all(float(r["train_nfe_backward"]) > 0 for r in rows)
    assert (tmp_path / "f3" / "fig3.png").is_file()


def test_fig3_needs_an_ode_model(tmp_path, capsys):
    run = tmp_path / "mlp"
    assert train(run, "--model", "mlp", "--epochs", "1") == 0
    assert main(["analyze", "mnist-fig3", "--run", str(run), "--out", str(tmp_path)]) == 2
    assert "needs an ODE model" in capsys.readouterr().err


def test_an_empty_data_dir_is_an_error_not_a_fallback_to_the_shared_copy(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        M.load_split("train-5k", str(empty))
    # without --data-dir the shared offline copy may serve (it holds the 5k subset)
    if (SHARED / "train-5k-images-idx3-ubyte.gz").is_file():
        assert len(M.load_split("test", str(SHARED))) == 10000


def test_odenet_trains_with_compile_to_the_eager_numbers(tmp_path):
    """--compile: the ODE-Net's forward solves run as compiled loops (adjoint gradients), and
    the epoch ends with the eager run's loss, errors and function evaluations."""
    odenet = ["--model", "odenet", "--width", "8", "--method", "dopri5", "--tol", "1e-3",
              "--epochs", "1"]
    assert train(tmp_path / "eager", *odenet) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # compiled, not a fallback
        assert train(tmp_path / "compiled", *odenet, "--compile") == 0
    e = read_csv(tmp_path / "eager" / "metrics.csv")[-1]
    c = read_csv(tmp_path / "compiled" / "metrics.csv")[-1]
    for k in ("train_loss", "train_error", "test_loss", "test_error", "nfe_forward",
              "nfe_backward", "test_nfe_forward"):
        assert float(c[k]) == pytest.approx(float(e[k]), rel=1e-5), k
