"""The `neuralode` command: dispatch, help and errors (the experiments test their own runs)."""

import subprocess
import sys

from neuralode import SOLVERS
from neuralode.cli import main


def test_methods_lists_every_solver(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in SOLVERS:
        assert name in out
    assert "adaptive, order 5(4)" in out  # dopri5's description comes from its tableau


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "train" in err


def test_unknown_training_name_lists_valid_ones(capsys):
    assert main(["train", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert "unknown name 'imagenet'" in err and "valid names are" in err


def test_train_without_name_prints_usage(capsys):
    assert main(["train"]) == 2
    assert "usage: neuralode train NAME" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "neuralode", "methods"], capture_output=True,
                         text=True, check=True)
    assert "dopri5" in out.stdout
