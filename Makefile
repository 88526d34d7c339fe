# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create (or reuse) the project's own virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neuralode-installed

.PHONY: demo test setup bench clean lint

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --constraint constraints.txt -e ".[apps,test]"
	@$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neuralode demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/solver_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
