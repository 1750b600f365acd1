# matcouple: `make demo` runs the main job on the embedded database, `make test` the tests.
# Both build the virtualenv first (Python >= 3.10, CPU torch 2.13.0 unless one is there).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
export FW_CONFIG_FILE := $(CURDIR)/fw_configs/FW_config.yaml

.PHONY: install sysdeps demo test lint db-start db-stop benchmark benchmark-dft benchmark-design clean-db

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,dft,vasp,mlip]"
	touch $@

install: $(VENV)/.installed

# System packages, installed with apt only where missing.
# GPAW (the [dft] extra) compiles against libxc, OpenBLAS, FFTW and MPI.
DFT_APT := libxc-dev libopenblas-dev libfftw3-dev libopenmpi-dev
sysdeps:
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { \
	  echo "installing python3-venv with apt"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv python3-dev; }
	@missing=$$(for p in $(DFT_APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	command -v cc >/dev/null 2>&1 || missing="$$missing build-essential"; \
	$(PYTHON) -c "import os, sysconfig; assert os.path.exists(os.path.join( \
	  sysconfig.get_paths()['include'], 'Python.h'))" 2>/dev/null || missing="$$missing python3-dev"; \
	if [ -n "$$(echo $$missing)" ]; then \
	  echo "installing$$(printf ' %s' $$missing) with apt (to build GPAW)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

demo: install
	OMP_NUM_THREADS=1 $(BIN)/matcouple demo

test: install
	$(BIN)/ruff check matcouple tests benchmarks notebooks
	$(BIN)/pytest -q tests

lint: install
	$(BIN)/ruff check matcouple tests benchmarks notebooks

db-start: install
	$(BIN)/matcouple db start

db-stop: install
	$(BIN)/matcouple db stop

benchmark: install
	$(BIN)/python benchmarks/launchpad.py

benchmark-dft: install
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/dft.py

benchmark-design: install
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/design.py
