# One-command setup and tests. `make setup` is idempotent: it rebuilds .venv only when setup.py changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-gpu docs clean-venv

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# End to end on CPU: synthetic corpus → tokenizer → shards → AR model → samples → runs/demo/report.
demo: setup
	$(VENV)/bin/videoar demo --out runs/demo

# CPU test suite (GPU tests skip themselves without CUDA).
test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests

# On a GPU host: only the tests marked gpu.
test-gpu: setup
	$(VENV)/bin/python -m pytest -q -m gpu $(PYTEST_ARGS) tests

# docs/recipes.md is generated from the config field docstrings; tests/test_docs.py fails when it is stale.
docs: setup
	$(VENV)/bin/python -m videoar_common.recipe_docs --write docs/recipes.md

clean-venv:
	rm -rf $(VENV)
