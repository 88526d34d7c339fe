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
import inspect
import os
import re
import shlex
import shutil
import sys
from typing import NoReturn

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
COMMANDS = ("analyze", "demo", "methods", "train")
PROG = "neuralode"


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are short: the error, then the usage where it fits
    on one line, else where to find it (argparse's own prints the whole usage, 18 lines for
    a training command, above a one-line error)."""

    def error(self, message: str) -> NoReturn:
        usage = self.format_usage().strip()
        hint = (usage if "\n" not in usage and len(usage) <= 100
                else f"Run '{self.prog} --help' for the usage and the options.")
        self.exit(2, f"{self.prog}: error: {message}\n{hint}\n")


def module_invocation() -> str:
    """How ``python -m neuralode`` was run, as a command to print: ``python`` where that
    name on PATH is this interpreter, else this interpreter's path."""
    exe = sys.executable or "python"
    name = os.path.basename(exe)
    found = shutil.which(name)
    shown = name if found and os.path.abspath(found) == os.path.abspath(exe) else exe
    return f"{shlex.quote(shown)} -m neuralode"


def _available(table: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in table.items() if importlib.util.find_spec(v) is not None}


def build_parser(kind: str, name: str, prog: str = PROG) -> Parser:
    """The parser of ``neuralode train NAME`` (``kind="train"``), ``analyze NAME`` or
    ``demo`` (``name`` ignored)."""
    if kind == "demo":
        parser = Parser(prog=f"{prog} demo")
        importlib.import_module(DEMO_MODULE).build_parser(parser)
        return parser
    table = {"train": TRAINERS, "analyze": ANALYSES}[kind]
    module = importlib.import_module(table[name])
    parser = Parser(prog=f"{prog} {kind} {name}")
    if kind == "analyze":
        module.build_parser(parser, name)
    else:
        module.build_parser(parser)
    return parser


def _dispatch(kind: str, table: dict[str, str], argv: list[str], prog: str) -> int:
    available = _available(table)
    names = ", ".join(sorted(available)) or "(none)"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} {kind} NAME [options]\n\navailable: {names}\n"
              f"Run '{prog} {kind} NAME --help' for the options of one of them.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in available:
        print(f"{prog} {kind}: unknown name {name!r}; valid names are: {names}",
              file=sys.stderr)
        return 2
    return _run(available[name], kind, name, rest, prog)


def _run(module_name: str, kind: str, name: str, argv: list[str], prog: str) -> int:
    """Parse ``argv`` for ``neuralode KIND NAME`` and call the module's ``run``."""
    module = importlib.import_module(module_name)
    args = build_parser(kind, name, prog).parse_args(argv)
    args.command_name = name
    args.argv = argv  # to print the command that resumes an interrupted run
    args.invocation = prog  # ... the way this process was started
    return int(module.run(args) or 0)


def plain_text(text: str) -> str:
    """reStructuredText inline markup as terminal text: ``code`` and :role:`x` lose their
    backticks and roles."""
    text = re.sub(r":[\w:.-]+:`~?([^`]*)`", r"\1", text)
    return text.replace("``", "")


def describe_method(cls: type) -> str:
    """One line for ``neuralode methods``: the method's ``describe()``; where that is the
    default (the docstring's first line, which may stop mid-sentence), the docstring's whole
    first paragraph joined into one line. RST markup removed, no final period."""
    text = cls.describe()  # type: ignore[attr-defined]
    doc = inspect.cleandoc(cls.__doc__ or "")
    if doc and text.strip() == doc.splitlines()[0].strip():
        text = doc.split("\n\n")[0]
    return " ".join(plain_text(text).split()).rstrip(".")


def _methods(argv: list[str], prog: str) -> int:
    parser = Parser(prog=f"{prog} methods",
                    description="List the ODE solvers: the names odeint(method=...) and every "
                                "--method option take, each with a one-line description.")
    parser.parse_args(argv)
    from neuralode.solvers import ALIASES, SOLVERS

    width = max(len(n) for n in SOLVERS)
    for name, cls in SOLVERS.items():
        print(f"{name:<{width}}  {describe_method(cls)}")
    print("\naliases: " + ", ".join(f"{a} = {n}" for a, n in sorted(ALIASES.items())))
    return 0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); ``prog`` is how the
    command was invoked (``neuralode``, or ``python -m neuralode``), used in usage lines
    and in the commands it prints. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print((__doc__ or "").strip().split("\n\nEach experiment")[0]
              .replace("The ``neuralode`` command.", f"usage: {prog} COMMAND ..."))
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"{prog}: unknown command {cmd!r}; valid commands are: {', '.join(COMMANDS)}\n"
              f"Run '{prog} --help' for what they do.", file=sys.stderr)
        return 2
    if cmd == "train":
        return _dispatch("train", TRAINERS, rest, prog)
    if cmd == "analyze":
        return _dispatch("analyze", ANALYSES, rest, prog)
    if cmd == "methods":
        return _methods(rest, prog)
    return _run(DEMO_MODULE, "demo", "", rest, prog)


if __name__ == "__main__":
    raise SystemExit(main())
