# The commands a person types. `make train` and `make test` set everything up on a fresh
# machine: they create .venv if it is missing and install kdad with its dev extras into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdad-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help install train test test-all test-floors mutate lint format bench clean

help:
	@echo "make train   set up .venv and run the built-in demo (synthetic data, CPU, a few minutes)"
	@echo "make test    set up .venv and run the test suite (tests marked slow deselected)"
	@echo "make test-all  the suite including tests marked slow (DDP simulation, plugin sweeps)"
	@echo "make test-floors  the tests again with the lowest declared dependency versions (before a release)"
	@echo "make mutate  plant each defect of tests/_mutation/patches in a scratch copy: its tests must fail"
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

# Two workers, one thread each (small CPU tests use two cores better that way); the tests of an
# xdist_group stay together and in order on one worker (tests/test_readme_commands.py's do).
WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-all: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) --dist loadgroup -m "slow or not slow" $(PYTEST_ARGS)

# Before a release: the lowest declared versions of the Python-level dependencies
# (tests/floors.sh; FLOOR_TORCH=1 adds torch and torchvision, several GB).
test-floors: install
	bash tests/floors.sh $(PYTEST_ARGS)

# Mutation check (tests/_mutation/run.py): each patch plants one defect in a scratch copy of the
# checkout and runs the tests it names, which must fail. MUTANTS=name1 name2 picks some.
MUTANTS ?=
mutate: install
	$(BIN)/python tests/_mutation/run.py $(MUTANTS)

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
