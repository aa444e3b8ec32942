# The commands a person types. `make train` and `make test` set everything up on a fresh
# machine: they create .venv if it is missing and install kdad with its dev extras into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdad-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help install train test test-all lint format bench clean

help:
	@echo "make train   set up .venv and run the built-in demo (synthetic data, CPU, a few minutes)"
	@echo "make test    set up .venv and run the test suite (tests marked slow deselected)"
	@echo "make test-all  the suite including tests marked slow (DDP simulation, plugin sweeps)"
	@echo "make bench   the benchmarks of experiments/benchmark on this machine (DEVICE=cpu|cuda)"
	@echo "make lint    ruff check + format check;  make format: apply ruff's fixes and formatting"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install when the package's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# -qq: errors only. setuptools announces every editable install of a package-dir mapping
	@# (conf/ -> kdad.conf) with an "Editable installation" notice kdad cannot avoid.
	$(BIN)/python -m pip install -qq -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: install
	$(BIN)/kdad-train experiment=demo $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# The benchmarks (experiments/benchmark/README.md); the anomalib comparison needs the [bench] extra.
DEVICE ?= cpu
bench: install
	PATH="$(abspath $(BIN)):$$PATH" bash experiments/benchmark/run_all.sh $(DEVICE)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf logs .pytest_cache .ruff_cache
