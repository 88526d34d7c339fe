# Two entry points for a fresh machine (see README): `make demo` and `make test`
# (and `make lint`, which CI runs before `make test`).
# Both create (or reuse) the project's own virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neuralode-installed
LINT_STAMP := $(VENV)/.neuralode-lint-installed

.PHONY: demo test setup bench clean lint

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --constraint constraints.txt -e ".[apps,test]"
	@$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

setup: $(STAMP)

# ruff and mypy (the `lint` extra), installed with the same constraints as everything else
$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --constraint constraints.txt -e ".[lint]"
	touch $(LINT_STAMP)

demo: $(STAMP)
	$(VENV)/bin/neuralode demo --overwrite

# the suite in parallel, one worker a core, at most 8 (pytest-xdist; a test file stays on
# one worker, so that its compiled loops are compiled once); `$(PY) -m pytest -q` runs it in
# one process
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 8 --dist loadfile

# ruff on every Python file, mypy on the public surface (both configured in pyproject.toml)
# (both run, so that one pass reports everything; the target fails if either fails)
lint: $(LINT_STAMP)
	@status=0; \
	echo "$(PY) -m ruff check ."; $(PY) -m ruff check . || status=1; \
	echo "$(PY) -m mypy"; $(PY) -m mypy || status=1; \
	exit $$status

bench: $(STAMP)
	$(PY) benchmarks/solver_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
