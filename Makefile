# Two commands do everything on a fresh machine:  make repro  |  make test
# Both create (or reuse) the virtual environment .venv and install the project into it first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Some machines carry a pip constraints file that caps torch below the version pinned in pyproject.toml;
# the pins in pyproject.toml are the project's truth, so install without machine-wide pip config.
PIP_ENV := PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test test-avx2 lint ui bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP_ENV) $(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)
	test -d .git || (git init -q && git add -A && git -c user.name=petbreeds -c user.email=petbreeds@localhost commit -qm "petbreeds")
	dvc repro

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The numeric tests (marker `numeric`, tests/conftest.py) again on torch's and oneDNN's AVX2 kernels, as on a CPU
# without AVX-512 or AMX: a test that holds only by this CPU's floating-point rounding fails here, not elsewhere.
# tests/test_pipeline_e2e.py (~2 min) is left out: its numeric checks compare copies of one run's numbers (a run-cache
# restore against the run it came from, MLflow against plots/*.csv), never numbers computed with other kernels.
test-avx2: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -m numeric --ignore=tests/test_pipeline_e2e.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --artifacts-destination $(CURDIR)/mlartifacts \
		--host 127.0.0.1 --port 5000 --workers 1

bench: $(STAMP)
	$(BIN)/python bench/data_pipeline.py

clean-venv:
	rm -rf $(VENV)
