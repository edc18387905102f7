# Two commands on a fresh machine:  `make demo`  and  `make test`  (each sets up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
# the venv's bin first, so Snakemake's shell: rules find the right python and `phenoprofiler`
export PATH := $(BIN):$(PATH)

.PHONY: setup demo test test-fast bench lint mutants clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)  ## run the embedded real demo end to end -> results/demo/report.html
	snakemake --cores $(CORES) --configfile config/demo.yaml
	@echo "report: results/demo/"

test: $(STAMP)  ## the whole test suite
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## unit tests only (skips workflow runs and training)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: $(STAMP)  ## ruff (lint + format check), snakefmt --check, snakemake --lint: all must be clean
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check workflow
	$(BIN)/snakemake --lint --configfile config/demo.yaml

MUTANTS_STAMP := $(VENV)/.mutants-installed
$(MUTANTS_STAMP): pyproject.toml $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[test,mutants]'
	touch $(MUTANTS_STAMP)

# Mutation testing (slow, CPU-heavy, one worker, not in CI): score per module, survivors with diffs.
# One module or a few:  make mutants MODULES="metrics io"   (modules: tools/mutation/mutants.toml)
# Options of run_mutants.py:  make mutants MODULES=tiles MUTANTS_ARGS=--before  (then --rerun-survivors)
MODULES ?=
MUTANTS_ARGS ?=
mutants: $(MUTANTS_STAMP)
	nice -n 15 $(BIN)/python tools/mutation/run_mutants.py $(MUTANTS_ARGS) $(MODULES)

clean:
	rm -rf results .snakemake
