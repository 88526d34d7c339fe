"""The `neuralode` command: dispatch, help and errors (the experiments test their own runs)."""

import subprocess
import sys
from argparse import SUPPRESS

import pytest

from neuralode import SOLVERS
from neuralode.cli import ANALYSES, TRAINERS, build_parser, main


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


# --------------------------------------------------------------------------- methods


def test_methods_gives_whole_plain_one_line_descriptions(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":class:" not in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name in SOLVERS:
        desc = lines[name][len(name):].strip()
        assert desc and desc.count("(") == desc.count(")"), lines[name]
        assert not desc.endswith((",", "(", ";", ":")), lines[name]
    # the Adams methods' descriptions come from their docstrings' first paragraphs
    assert "RK4 start, fixed grid" in lines["explicit_adams"]
    assert "order up to max_order (default 4, at most 12)" in lines["explicit_adams"]
    assert "aliases:" in out and "heun = heun2" in out


def test_methods_refuses_options_with_its_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["methods", "--foo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --foo" in err and "usage: neuralode methods" in err
    assert len(err.strip().splitlines()) == 2


# --------------------------------------------------------------------------- help


COMMANDS = ([("train", name) for name in TRAINERS] + [("analyze", name) for name in ANALYSES]
            + [("demo", "")])


@pytest.mark.parametrize("kind,name", COMMANDS, ids=[f"{k} {n}".strip() for k, n in COMMANDS])
def test_every_option_of_every_command_has_help(kind, name):
    parser, command = build_parser(kind, name), f"{kind} {name}"
    visible = {a.dest for a in parser._actions if a.option_strings and a.help != SUPPRESS}
    for action in parser._actions:
        if not action.option_strings:
            continue
        if action.help == SUPPRESS:  # only a hidden alias of a visible option
            assert action.dest in visible, (command, action.option_strings)
        else:
            assert action.help and action.help.strip(), (command, action.option_strings)
    assert parser.description and "``" not in parser.description, command
    assert "on the shared runner" not in parser.description, command


@pytest.mark.parametrize("name", ["dynamics", "latent-ode", "stiff"])
def test_training_help_describes_the_command_in_a_paragraph(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 40, description
    assert "``" not in out and "shared runner" not in out
    assert "--no-plots" not in out  # the old spelling still works, but is not offered


# --------------------------------------------------------------------------- errors


def test_argument_errors_are_two_short_lines(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "dynamics", "--iters", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["neuralode train dynamics: error: argument --iters: expected a positive "
                   "integer, got 'x'",
                   "Run 'neuralode train dynamics --help' for the usage and the options."]


@pytest.mark.parametrize("command", [["train", name] for name in TRAINERS]
                         + [["analyze", "cnf-compare"]], ids=" ".join)
def test_unknown_method_is_refused_while_parsing(command, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([*command, "--method", "rk45", "--out", str(out)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not out.exists()  # no work, no progress output
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and "unknown method 'rk45'" in err[0], err
    assert "dopri5" in err[0] and "neuralode methods" in err[0]


def test_close_method_names_are_suggested(capsys):
    with pytest.raises(SystemExit):
        main(["train", "stiff", "--method", "kvaerno6"])
    assert "did you mean kvaerno" in capsys.readouterr().err


def test_python_dash_m_spells_its_commands_that_way(tmp_path):
    out = subprocess.run([sys.executable, "-m", "neuralode", "train", "dynamics", "--iters",
                          "x"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert " -m neuralode train dynamics --help" in out.stderr, out.stderr


def test_resume_command_is_spelled_the_way_the_run_was_started():
    from neuralode.experiments.dynamics import DynamicsExperiment
    from neuralode.experiments.runner import Run

    argv = ["--iters", "5", "--out", "runs/my run", "--overwrite"]
    args = build_parser("train", "dynamics").parse_args(argv)
    args.argv, args.invocation = argv, "python -m neuralode"
    assert Run(DynamicsExperiment(), args).resume_command() == (
        "python -m neuralode train dynamics --iters 5 --out 'runs/my run' --resume")
    del args.invocation  # the console script
    assert Run(DynamicsExperiment(), args).resume_command().startswith(
        "neuralode train dynamics --iters 5")
