# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installed extras, recorded so that `make setup` is a no-op when nothing changed.
CORE_STAMP := $(VENV)/.stamp-core
TEST_STAMP := $(VENV)/.stamp-test
DEMO_ARGS ?= --datasets=ml-100k --budget=demo

# Installs are pinned: pip gets `-c` with these lock files (`make lock` refreshes them).
# `LOCK=0` installs from pyproject's ranges instead; it then always reinstalls and leaves no
# stamp, so the next locked `make setup` puts the pins back.
LOCK ?= 1
CORE_LOCK := requirements/core.txt
TEST_LOCK := requirements/test.txt
ifeq ($(LOCK),0)
CORE_PIN :=
TEST_PIN :=
UNLOCKED := FORCE
else
CORE_PIN := -c $(CORE_LOCK)
TEST_PIN := -c $(TEST_LOCK)
UNLOCKED :=
endif

.PHONY: setup setup-test lock demo test test-slow bench lint clean FORCE

setup: $(CORE_STAMP)
setup-test: $(TEST_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(CORE_STAMP): pyproject.toml $(CORE_LOCK) $(UNLOCKED) | $(BIN)/python
	$(BIN)/python -m pip install -q -e . $(CORE_PIN)
	$(if $(UNLOCKED),rm -f $@,touch $@)

# The fast suite also runs the PyTorch parity tests: torch is pinned (CPU wheel) in the extra.
$(TEST_STAMP): $(CORE_STAMP) $(TEST_LOCK) $(UNLOCKED)
	$(BIN)/python -m pip install -q -e ".[dev,torch]" $(TEST_PIN)
	$(if $(UNLOCKED),rm -f $@,touch $@)

# Re-resolve pyproject's ranges in a throwaway venv, the way setup + setup-test install (core,
# then the extras on top, held to the new core pins), and freeze each step into its lock file.
# test.txt also pins setuptools: torch needs it at run time. Needs only PyPI (and pip's config).
lock:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; py=$$tmp/venv/bin/python; \
	$(PYTHON) -m venv $$tmp/venv; $$py -m pip install -q --upgrade pip; \
	hdr() { echo "# Pins for \`make $$1\`: pip install $$2"; \
	  echo "# Written by \`make lock\` on $$(date -u +%F) ($$($$py -V), $$(uname -sm))."; }; \
	$$py -m pip install -q -e .; \
	{ hdr setup "-e . -c $(CORE_LOCK)"; \
	  $$py -m pip freeze --exclude-editable; } > $$tmp/core.txt; \
	$$py -m pip install -q -e ".[dev,torch]" -c $$tmp/core.txt; \
	{ hdr setup-test "-e '.[dev,torch]' -c $(TEST_LOCK)"; \
	  $$py -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > $$tmp/test.txt; \
	mkdir -p requirements; mv $$tmp/core.txt $(CORE_LOCK); mv $$tmp/test.txt $(TEST_LOCK); \
	echo "wrote $(CORE_LOCK) and $(TEST_LOCK)"

FORCE:

demo: setup
	$(BIN)/python -m tools.leaderboard $(DEMO_ARGS)

# One pytest worker per core (pytest-xdist): the suite is compile-bound, XLA:CPU programs
# are small. `PYTEST_ARGS=-n0` runs it in one process.
PYTEST_ARGS ?= -n auto
test: setup-test
	LLM4REC_LOCK=$(LOCK) $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

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
