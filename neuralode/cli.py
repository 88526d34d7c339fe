"""The ``neuralode`` command.

Subcommands:
  demo                 the main demo
  train NAME ...       train a model (one module per experiment in neuralode.experiments)
  analyze NAME ...     an analysis that writes plots and tables
  methods              list the ODE solvers

Each experiment module provides ``build_parser(parser)`` (adds its own arguments to the
argparse parser it is given) and ``run(args) -> int``. The library never imports this file.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> module. Only modules that exist in this install are offered.
TRAINERS = {
    "mnist": "neuralode.experiments.mnist",
    "dynamics": "neuralode.experiments.dynamics",
    "latent-ode": "neuralode.experiments.latent_ode",
    "cnf": "neuralode.experiments.cnf",
    "stiff": "neuralode.experiments.stiff",
}
ANALYSES = {
    "mnist-table1": "neuralode.experiments.mnist_analysis",
    "mnist-fig3": "neuralode.experiments.mnist_analysis",
    "cnf-compare": "neuralode.experiments.cnf_compare",
}
DEMO_MODULE = "neuralode.experiments.demo"


def _available(table: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in table.items() if importlib.util.find_spec(v) is not None}


def _dispatch(kind: str, table: dict[str, str], argv: list[str]) -> int:
    available = _available(table)
    names = ", ".join(sorted(available)) or "(none)"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: neuralode {kind} NAME [options]\n\navailable: {names}\n"
              f"Run 'neuralode {kind} NAME --help' for the options of one of them.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in available:
        print(f"neuralode {kind}: unknown name {name!r}; valid names are: {names}", file=sys.stderr)
        return 2
    module = importlib.import_module(available[name])
    parser = argparse.ArgumentParser(prog=f"neuralode {kind} {name}")
    if kind == "analyze":
        module.build_parser(parser, name)
    else:
        module.build_parser(parser)
    args = parser.parse_args(rest)
    args.command_name = name
    args.argv = rest  # to print the command that resumes an interrupted run
    return int(module.run(args) or 0)


def _methods() -> int:
    from neuralode.solvers import SOLVERS

    width = max(len(n) for n in SOLVERS)
    for name, cls in SOLVERS.items():
        print(f"{name:<{width}}  {cls.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo", "train", "analyze", "methods"}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n\nEach experiment")[0].replace("The ``neuralode`` command.",
                                                                        "usage: neuralode COMMAND ..."))
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in commands:
        print(f"neuralode: unknown command {cmd!r}; valid commands are: "
              f"{', '.join(sorted(commands))}", file=sys.stderr)
        return 2
    if cmd == "train":
        return _dispatch("train", TRAINERS, rest)
    if cmd == "analyze":
        return _dispatch("analyze", ANALYSES, rest)
    if cmd == "methods":
        return _methods()
    module = importlib.import_module(DEMO_MODULE)
    parser = argparse.ArgumentParser(prog="neuralode demo")
    module.build_parser(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
