# matcouple: `make demo` runs the main job on the embedded database, `make test` the tests.
# Both build the virtualenv first (Python >= 3.10, CPU torch 2.13.0 unless one is there).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export FW_CONFIG_FILE := $(CURDIR)/fw_configs/FW_config.yaml

.PHONY: install sysdeps demo test lint db-start db-stop benchmark clean-db

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# System packages, installed with apt only where missing.
sysdeps:
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { \
	  echo "installing python3-venv with apt"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv python3-dev; }

demo: install
	$(BIN)/matcouple demo

test: install
	$(BIN)/ruff check matcouple tests benchmarks
	$(BIN)/pytest -q tests

lint: install
	$(BIN)/ruff check matcouple tests benchmarks

db-start: install
	$(BIN)/matcouple db start

db-stop: install
	$(BIN)/matcouple db stop

benchmark: install
	$(BIN)/python benchmarks/launchpad.py
