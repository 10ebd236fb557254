# Two commands on a fresh machine: `make train` and `make test` (both create .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install train test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Default experiment (tiny model, synthetic benchmark, CPU). Extra overrides: make train ARGS="loss=vsepp"
train: $(STAMP)
	$(PY) -m fne_lightning.train $(ARGS)

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_fne.py
	$(PY) benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
