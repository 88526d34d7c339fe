"""``python -m neuralode``: the ``neuralode`` command, with the commands it prints (usage,
the command that resumes a run) spelled the way it was run."""

from neuralode.cli import main, module_invocation

if __name__ == "__main__":
    raise SystemExit(main(prog=module_invocation()))
