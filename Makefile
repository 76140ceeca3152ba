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

.PHONY: install repro test lint ui bench clean-venv

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
