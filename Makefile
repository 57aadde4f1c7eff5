# One-command entry points. `make run` sets up and runs the main job on the embedded dataset;
# `make test` sets up and runs the test-suite. Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test bench lab clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,notebooks]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python -m workbench reproduce --config neon-trees

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_ops.py

lab: setup
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) cache runs reports
