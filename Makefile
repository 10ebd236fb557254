# Two commands on a fresh machine: `make train` and `make test` (both create .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# Processes the test suite runs in (pytest-xdist); 0 runs it in this one process.
TEST_WORKERS ?= 2

.PHONY: install train test docs docs-reference lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,docs]"
	touch $(STAMP)

install: $(STAMP)

# Default experiment (tiny model, synthetic benchmark, CPU). Extra overrides: make train ARGS="loss=vsepp"
train: $(STAMP)
	$(PY) -m fne_lightning.train $(ARGS)

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=25 $(ARGS)

# The documentation site into docs/_build/html; every warning (a broken link or anchor, a bad
# docstring) fails the build.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

# Regenerate docs/reference/configuration.md from conf/ (a test fails when it is out of date).
docs-reference: $(STAMP)
	$(PY) docs/tools/config_reference.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks docs

bench: $(STAMP)
	$(PY) benchmarks/bench_fne.py
	$(PY) benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache docs/_build
