"""Tests for `neuralode demo`: the solver table and the end-to-end demo on a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuralode.cli import build_parser, main
from neuralode.experiments import demo


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def table():
    return demo.solver_table()


def test_solver_table_covers_problems_and_methods(table):
    problems = {r["problem"] for r in table}
    assert len(problems) == 3 and any("Kepler" in p for p in problems)
    assert len(table) == 3 * len(demo.TABLE_METHODS)
    for r in table:
        assert r["nfe"] > 0 and r["accepted"] > 0 and r["time_ms"] >= 0


def test_solver_table_errors_are_small_and_ordered(table):
    by = {(r["problem"].split()[0], r["method"].split()[0]): r for r in table}
    for problem in ("Kepler", "Lotka-Volterra", "spiral"):
        for method in ("dopri5", "tsit5", "bosh3", "dopri8", "rk4"):
            # higher-order methods meet a loose accuracy bar on these smooth problems
            assert by[(problem, method)]["error"] < 1e-3, (problem, method)
        # the 8th-order method needs fewer evaluations than the 3rd-order one
        assert by[(problem, "dopri8")]["nfe"] < by[(problem, "bosh3")]["nfe"]
        # first-order Euler is far less accurate than RK4 with a 2x larger step
        assert by[(problem, "euler")]["error"] > 100 * by[(problem, "rk4")]["error"]


def test_format_table_lists_every_row(table):
    text = demo.format_table(table)
    assert text.count("dopri5") == 3 and "NFE" in text and "Kepler" in text


def test_demo_command_runs_end_to_end_and_writes_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--iters", "6", "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Solver table" in text and "Kepler" in text
    assert "trajectory MSE vs clean truth" in text and "Result:" in text
    assert "three panels" in text and "left:" not in text  # the figure has three panels
    assert (out / "dynamics.png").stat().st_size > 1000
    assert (out / "solver_table.txt").read_text().startswith("Solver table")
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["field"] == "spiral" and m["config"]["gradient"] == "adjoint"
    assert m["iters"] == 6 and m["traj_mse"] > 0


def test_demo_verdict_reflects_fit(tmp_path, capsys):
    # too short to fit: the demo must say so rather than claim success
    assert main(["demo", "--iters", "2", "--out", str(tmp_path), "--skip-table", "--quiet",
                 "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "NOT CONVERGED" in text and "Solver table" not in text


TINY = ["demo", "--iters", "2", "--skip-table", "--quiet", "--no-plot"]


def test_demo_never_replaces_an_earlier_demo_without_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main([*TINY, "--out", str(out)]) == 0
    (out / "solver_table.txt").write_text("an earlier table\n")
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main([*TINY, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before any work
    err = captured.err.strip()
    assert err.startswith("neuralode demo: error:") and len(err.splitlines()) == 1
    assert "already holds a demo" in err and "--overwrite" in err and "--resume" in err
    assert (out / "checkpoint.pt").read_bytes() == before
    # --overwrite starts again (and removes the earlier table, which this run does not make)
    assert main([*TINY, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "solver_table.txt").exists()
    assert json.loads((out / "metrics.json").read_text())["finished"] is True
    # --resume with a larger --iters extends the finished training part
    assert main([*TINY, "--out", str(out), "--resume", "--iters", "3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["iters"] == 3
    assert main([*TINY, "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_demo_resume_without_a_run_is_refused_before_the_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "none"), "--resume", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "Solver table" not in captured.out and "no checkpoint" in captured.err


def test_no_plot_is_the_one_spelling_and_no_plots_still_works(capsys):
    for argv in (["demo"], ["train", "dynamics"]):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        text = capsys.readouterr().out
        assert "--no-plot " in text and "--no-plots" not in text, argv
    for kind, name in (("demo", ""), ("train", "dynamics")):
        parser = build_parser(kind, name)
        assert parser.parse_args(["--no-plots"]).no_plot is True
        assert parser.parse_args(["--no-plot"]).no_plot is True
        assert parser.parse_args([]).no_plot is False


def test_make_demo_can_be_run_again():
    # `make demo` is what a new user runs, maybe twice: it replaces its own earlier demo
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    demo_lines = [line for line in recipe.splitlines() if "neuralode demo" in line]
    assert demo_lines and all("--overwrite" in line for line in demo_lines), recipe
