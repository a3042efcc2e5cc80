# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installed extras, recorded so that `make setup` is a no-op when nothing changed.
CORE_STAMP := $(VENV)/.stamp-core
TEST_STAMP := $(VENV)/.stamp-test
DEMO_ARGS ?= --datasets=ml-100k --budget=demo

.PHONY: setup setup-test demo test test-slow bench lint clean

setup: $(CORE_STAMP)
setup-test: $(TEST_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(CORE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# The fast suite also runs the PyTorch parity tests: torch is pinned (CPU wheel) in the extra.
$(TEST_STAMP): $(CORE_STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,torch]"
	touch $@

demo: setup
	$(BIN)/python -m tools.leaderboard $(DEMO_ARGS)

# One pytest worker per core (pytest-xdist): the suite is compile-bound, XLA:CPU programs
# are small. `PYTEST_ARGS=-n0` runs it in one process.
PYTEST_ARGS ?= -n auto
test: setup-test
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup-test
	$(BIN)/python -m pytest -q -m slow

bench: setup-test
	@set -e; for b in tools/bench_*.py; do [ -e "$$b" ] || continue; \
	  echo "== $$b"; $(BIN)/python -m tools.$$(basename $$b .py); done

# Formatting and lint (ruff); `.ci/run` runs it before the tests.
lint: setup-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
